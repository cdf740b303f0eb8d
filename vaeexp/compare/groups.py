"""Runs grouped by their settings over seeds: one seed says little (two seeds of one setting
differ by about as much as the settings people sweep), so a report compares groups, with their
spread, and never averages a failed or diverged run in silently."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np

from vaeexp.compare.runs import METRICS, SEED, Row

GROUP_METRICS = (*METRICS, "iwae")  # "iwae": the IWAE bound most runs have (runs.iwae_key)
STATS = ("mean", "std", "min", "max")  # std: the sample standard deviation (n - 1), n >= 2
BANDS = ("std", "minmax")  # a learning curve's band: mean +- 1 std, or min to max


@dataclass
class Group:
    label: str  # "latent_dim=8 lr=0.001"; "all runs" when grouped by nothing
    values: dict[str, str]  # the grouping settings' values
    members: list[Row]  # best first; runs without a final test loss last
    stats: dict[str, dict[str, float]]  # metric -> n, mean, std (n >= 2), min, max
    representative: Row  # the median finished run by test loss (the lower median when even)

    @property
    def finished(self) -> list[Row]:
        return [r for r in self.members if r.ok]

    @property
    def others(self) -> list[Row]:
        return [r for r in self.members if r is not self.representative]

    def problems(self) -> str:
        """'1 diverged, 1 failed' for the members left out of the statistics; '' if none."""
        left_out = Counter(r.status.lower() for r in self.members if not r.ok)
        return ", ".join(f"{n} {status}" for status, n in sorted(left_out.items()))

    def stat(self, metric: str, stat: str) -> float | None:
        return self.stats.get(metric, {}).get(stat)

    def sort_key(self) -> tuple[bool, float, str]:
        mean = self.stat("test/loss", "mean")
        return (mean is None, math.inf if mean is None else mean, self.label)


def grouping(keys: list[str], *, group_by: list[str] | None, group: bool) -> list[str] | None:
    """The settings runs are grouped by: `group_by` if given, else every swept setting but the
    seed when the runs differ in seed; None: each run on its own."""
    if not group:
        return None
    if group_by:
        return list(group_by)
    return [k for k in keys if k != SEED] if SEED in keys else None


def label_of(values: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in values.items()) or "all runs"


def statistics(values: list[float]) -> dict[str, float]:
    """n, mean, min, max, and the sample standard deviation (n - 1) where there are two or
    more values: one run has no spread to show."""
    a = np.asarray(values, dtype=float)
    out = {
        "n": float(a.size),
        "mean": float(a.mean()),
        "min": float(a.min()),
        "max": float(a.max()),
    }
    if a.size >= 2:
        out["std"] = float(a.std(ddof=1))
    return out


def make_groups(rows: list[Row], by: list[str] | None) -> list[Group]:
    """The rows (best first) in groups sorted by mean final test loss; groups with no finished
    run last. `by` None: a group per run, named after the run."""
    buckets: dict[tuple[str, ...], list[Row]] = {}
    for row in rows:
        key = (row.run_id,) if by is None else tuple(row.values.get(k, "") for k in by)
        buckets.setdefault(key, []).append(row)
    groups = []
    for members in buckets.values():
        values = dict(members[0].values) if by is None else {k: members[0].values[k] for k in by}
        label = members[0].name if by is None else label_of(values)
        groups.append(_group(label, values, members))
    return sorted(groups, key=Group.sort_key)


def _group(label: str, values: dict[str, str], members: list[Row]) -> Group:
    finished = sorted((r for r in members if r.ok), key=lambda r: r.metrics["test/loss"])
    members = finished + [r for r in members if not r.ok]
    stats = {}
    for metric in GROUP_METRICS:
        got = [r.metrics[metric] for r in finished if metric in r.metrics]
        if got:
            stats[metric] = statistics(got)
    representative = finished[(len(finished) - 1) // 2] if finished else members[0]
    return Group(label, values, members, stats, representative)


def band(group: Group, kind: str = "std") -> tuple[np.ndarray, ...] | None:
    """(epochs, mean, low, high) of the finished members' test-loss curves, epoch by epoch
    over the members that reached it; None without a curve. The band is mean +- 1 std (none
    where one run is left) or min..max."""
    by_step: dict[int, list[float]] = {}
    for row in group.finished:
        for step, value in row.curve:
            by_step.setdefault(step, []).append(value)
    if not by_step:
        return None
    steps = np.array(sorted(by_step))
    values = [np.asarray(by_step[s]) for s in steps]
    mean = np.array([v.mean() for v in values])
    if kind == "minmax":
        low, high = np.array([v.min() for v in values]), np.array([v.max() for v in values])
    else:
        std = np.array([v.std(ddof=1) if v.size > 1 else 0.0 for v in values])
        low, high = mean - std, mean + std
    return steps, mean, low, high
