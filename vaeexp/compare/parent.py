"""What a grouped report leaves in MLflow itself: on the sweep's parent run, one metric per group
and statistic; on each child, its group as a tag, so the MLflow UI's own "group by" finds it.

MLflow metric names may hold only letters, digits, `_ - . /` and spaces (and `:`, except on
Windows), so a group's settings are spelled `key-value`, one path segment each:
`latent_dim=8 lr=0.001` becomes `group/latent_dim-8/lr-0.001/test_loss_mean`. Any other
character becomes `_`; a name MLflow would reject as too long keeps its start and a hash.
"""

from __future__ import annotations

import hashlib
import re
from concurrent.futures import ThreadPoolExecutor

from mlflow.entities import RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH

from vaeexp.compare.groups import GROUP_METRICS, STATS, Group
from vaeexp.tracking.store import log_changed

GROUP_TAG = "group"  # on each child: its group's label, "latent_dim=8 lr=0.001"
KEYS_TAG = "group.keys"  # on the parent: the settings the runs were grouped by
GROUP_PREFIX = "group"  # the parent's group metrics: group/latent_dim-8/test_loss_mean
_BAD = re.compile(r"[^\w.\- ]")  # what MLflow allows in a name on every platform


def segment(text: str) -> str:
    """One path segment of a metric name: allowed characters only, never '' or '.' or '..'."""
    text = _BAD.sub("_", text).strip()
    return text if text.strip(".") else f"_{text}_"


def group_path(group: Group) -> str:
    """`group/latent_dim-8/lr-0.001`: where the group's metrics live."""
    parts = [segment(f"{k}-{v}") for k, v in group.values.items()] or ["all"]
    return "/".join([GROUP_PREFIX, *parts])


def metric_names(groups: list[Group], iwae_key: str | None) -> dict[str, dict[str, str]]:
    """group label -> {"test/loss.mean": "group/latent_dim-8/test_loss_mean", ...}; distinct
    groups get distinct names even where their settings differ only in replaced characters."""
    short = {m: m.replace("/", "_") for m in GROUP_METRICS}
    short["iwae"] = iwae_key or "test_nll_iwae"
    longest = max(len(f"{s}_{t}") for s in short.values() for t in (*STATS, "n"))
    seen: set[str] = set()
    out = {}
    for group in groups:
        path = group_path(group)
        if len(path) + 1 + longest > MAX_ENTITY_KEY_LENGTH:
            digest = hashlib.sha1(group.label.encode()).hexdigest()[:8]
            path = f"{path[: MAX_ENTITY_KEY_LENGTH - longest - 11].rstrip('/ ')}-{digest}"
        base, n = path, 1
        while path in seen:
            n += 1
            path = f"{base}-{n}"
        seen.add(path)
        names = {f"{m}.{s}": f"{path}/{short[m]}_{s}" for m in GROUP_METRICS for s in STATS}
        names |= {"runs": f"{path}/n_runs", "finished": f"{path}/n_finished"}
        out[group.label] = names
    return out


def group_metrics(groups: list[Group], iwae_key: str | None) -> dict[str, float]:
    """Every group's statistics as parent-run metrics: mean, std, min and max of each final
    metric over its finished runs, and how many runs it has and how many finished."""
    names = metric_names(groups, iwae_key)
    out = {}
    for group in groups:
        name = names[group.label]
        out[name["runs"]] = float(len(group.members))
        out[name["finished"]] = float(len(group.finished))
        for metric in GROUP_METRICS:
            for stat in STATS:
                value = group.stat(metric, stat)
                if value is not None:
                    out[name[f"{metric}.{stat}"]] = value
    return out


def log_groups(
    client: MlflowClient,
    parent: str,
    groups: list[Group],
    by: list[str] | None,
    iwae_key: str | None,
    workers: int = 8,
) -> int:
    """Log the group metrics to the parent and tag each child whose tag differs; `by` None (runs
    not grouped) logs none. A value the parent already has is not logged again, and group metrics
    of an earlier grouping are superseded (NaN: MLflow deletes no metric). Returns the number of
    metric points logged."""
    metrics = group_metrics(groups, iwae_key) if by is not None else {}
    client.set_tag(parent, KEYS_TAG, grouping_label(by))
    n = log_changed(client, parent, metrics, supersede=f"{GROUP_PREFIX}/")
    if by is None:
        return n
    todo = [
        (row.run_id, group.label)
        for group in groups
        for row in group.members
        if row.tags.get(GROUP_TAG) != group.label
    ]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        list(pool.map(lambda t: client.log_batch(t[0], tags=[RunTag(GROUP_TAG, t[1])]), todo))
    return n


def grouping_label(by: list[str] | None) -> str:
    """The parent's `group.keys`: which grouping its group metrics are of."""
    if by is None:
        return "(not grouped: no group metrics)"
    return " ".join(by) or "(none: all runs in one group)"
