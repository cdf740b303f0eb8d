"""The report's tables, as Markdown and CSV: every run, and (grouped) every group with the mean,
standard deviation, min and max of each final metric."""

from __future__ import annotations

import csv
from pathlib import Path

from vaeexp.compare.groups import GROUP_METRICS, Group
from vaeexp.compare.runs import Row

LABELS = {
    "test/loss": "test loss",
    "test/recon": "test recon",
    "test/kl": "test KL",
    "test/neg_elbo": "test neg ELBO",
    "iwae": "IWAE bound",
}


def num(value: float | None, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def run_columns(keys: list[str], grouped: bool) -> list[str]:
    metrics = [LABELS[m] for m in GROUP_METRICS]
    return ["run", "status", *keys, *metrics, "epochs", "wall (s)", *(["group"] * grouped)]


def run_cells(row: Row, keys: list[str], group: str | None) -> list[str]:
    metrics = [num(row.metrics.get(m)) for m in GROUP_METRICS]
    cells = [row.name, row.status, *(row.values.get(k, "") for k in keys), *metrics]
    cells += [str(row.epochs), num(row.wall_s, 1)]
    return cells if group is None else [*cells, group]


def spread_text(group: Group, metric: str) -> str:
    """'512.31 ± 3.20 (508.59-515.07)'; one run: its value; none finished: ''."""
    mean, std = group.stat(metric, "mean"), group.stat(metric, "std")
    if mean is None:
        return ""
    if group.stat(metric, "n") == 1:
        return num(mean)
    low, high = group.stat(metric, "min"), group.stat(metric, "max")
    return f"{num(mean)} ± {num(std)} ({num(low)}-{num(high)})"


def group_columns(by: list[str]) -> list[str]:
    return ["group", "n", "finished", "left out", *by, *(LABELS[m] for m in GROUP_METRICS)]


def group_cells(group: Group, by: list[str]) -> list[str]:
    head = [group.label, str(len(group.members)), str(len(group.finished)), group.problems()]
    values = [group.values.get(k, "") for k in by]
    return [*head, *values, *(spread_text(group, m) for m in GROUP_METRICS)]


def _markdown(path: Path, head: list[str], body: list[list[str]]) -> Path:
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in line) + " |" for line in body]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_tables(
    rows: list[Row], groups: list[Group], keys: list[str], by: list[str] | None, out: Path
) -> list[Path]:
    """runs.md and runs.csv; grouped, also groups.md and groups.csv (one numeric column per
    metric and statistic)."""
    label = {r.run_id: g.label for g in groups for r in g.members} if by is not None else {}
    head = run_columns(keys, by is not None)
    body = [run_cells(r, keys, label.get(r.run_id)) for r in rows]
    files = [_markdown(out / "runs.md", head, body), out / "runs.csv"]
    with files[1].open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run_id", *head])
        writer.writerows([r.run_id, *line] for r, line in zip(rows, body, strict=True))
    if by is None:
        return files
    files.append(
        _markdown(out / "groups.md", group_columns(by), [group_cells(g, by) for g in groups])
    )
    stats = [(m, s) for m in GROUP_METRICS for s in ("mean", "std", "min", "max")]
    path = out / "groups.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            [
                "group",
                "n",
                "finished",
                "left out",
                *by,
                *(f"{LABELS[m]} {s}" for m, s in stats),
                "representative run_id",
            ]
        )
        for g in groups:
            numbers = [num(g.stat(m, s), 4) for m, s in stats]
            writer.writerow([*group_cells(g, by)[: 4 + len(by)], *numbers, g.representative.run_id])
    files.append(path)
    return files
