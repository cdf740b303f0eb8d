"""`python -m vaeexp.compare`: what each setting did, at a glance, over its seeds.

    python -m vaeexp.compare --sweep runs/multirun/2026-11-24/10-00-00.000000
    python -m vaeexp.compare --parent <the sweep's parent run id>
    python -m vaeexp.compare --experiment vaeexp --filter "params.latent_dim = '8'"
    python -m vaeexp.compare --sweep DIR --group-by latent_dim     # or --no-group

When the runs differ in `seed`, runs are grouped by all their other differing settings (or by
`--group-by KEY...`, settings or `tags.NAME` such as `tags.mlflow.source.git.commit`;
`--no-group`: each run on its own). Each group is one row: how many runs,
and the mean ± standard deviation (and min-max) over its finished runs of the final test loss,
recon, KL, true negative ELBO and IWAE bound; groups sorted by mean. A group with a failed or
diverged run says so; that run is never averaged in.

Writes the tables (runs.md / runs.csv, and groups.md / groups.csv), the final test loss against
each setting, each group's mean test-loss curve with a band (± 1 std, or min-max with
`--band minmax`), a contact sheet of each group's median run's final latent frame, and
report.html: one self-contained page with all of it, sortable by any column, with each group's
median-run film side by side and its other runs' films beneath, loaded when shown.

With a sweep's parent run (`--sweep`, `--parent`; without `--filter` or `--no-log`) the report
goes to its `report/` artifacts (the MLflow UI shows the HTML inline), each group's statistics
become parent metrics (`group/latent_dim-8/test_loss_mean`: MLflow names allow no `=`), and each
child gets its group as the tag `group`, for the MLflow UI's own "group by". `--experiment` and
`--filter` (an MLflow search filter, over several sweeps or before and after a change) log
nothing. Everything is read through MLflow's client, so it works on any store, a server too.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

from mlflow.tracking import MlflowClient

from vaeexp.compare.figures import contact_sheet, plot_curves, plot_loss_vs_values
from vaeexp.compare.groups import BANDS, Group, grouping, make_groups
from vaeexp.compare.page import FILMS, write_html
from vaeexp.compare.parent import KEYS_TAG, grouping_label, log_groups
from vaeexp.compare.runs import (
    collect,
    has_setting,
    iwae_key,
    parent_of_sweep,
    runs_for,
    swept_keys,
)
from vaeexp.compare.tables import write_tables

__all__ = ["BANDS", "FILM_BUDGET_MB", "best_group", "logs_to_parent", "parent_of_sweep", "report"]

log = logging.getLogger(__name__)
FILM_BUDGET_MB = 32.0  # films embedded in report.html, at most; the rest go beside it


def logs_to_parent(parent: str | None, filter_string: str | None, log_to_parent: bool) -> bool:
    """A report is logged to a sweep's parent run only when it covers that sweep's children,
    all of them: a filtered report is not the sweep's."""
    return parent is not None and log_to_parent and not filter_string


def report(
    client: MlflowClient,
    out: Path,
    *,
    parent: str | None = None,
    experiment: str | None = None,
    filter_string: str | None = None,
    group_by: list[str] | None = None,
    group: bool = True,
    band: str = "std",
    film_budget_mb: float = FILM_BUDGET_MB,
    log_to_parent: bool = True,
    workers: int = 8,
) -> list[Path]:
    """Write the report into `out`; log it, with the group metrics and tags, to the sweep's
    parent run. Returns the files written."""
    if band not in BANDS:
        raise ValueError(f"band={band!r}: one of {', '.join(BANDS)}")
    top, runs = runs_for(client, parent=parent, experiment=experiment, filter_string=filter_string)
    if not runs:
        where = f" under parent {parent}" if parent else f" in experiment {experiment or 'vaeexp'}"
        raise LookupError(
            f"no runs to compare{where}" + (" matching the filter" * bool(filter_string))
        )
    unknown = [k for k in group_by or [] if not any(has_setting(r, k) for r in runs)]
    if unknown:
        raise LookupError(f"--group-by {' '.join(unknown)}: no run has such a setting")
    keys = swept_keys(runs)
    by = grouping(keys, group_by=group_by, group=group)
    columns = keys + [k for k in by or [] if k not in keys]
    logged = top is not None and logs_to_parent(parent, filter_string, log_to_parent)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / FILMS, ignore_errors=True)  # a previous report's; so are these:
    for stale in ("groups.md", "groups.csv"):
        (out / stale).unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        rows = collect(client, runs, columns, Path(tmp), workers)
        groups = make_groups(rows, by)
        title = (
            f"vaeexp: {top.info.run_name}"
            if top
            else f"vaeexp: experiment {experiment or 'vaeexp'}"
        )
        plots = [
            plot_loss_vs_values(groups, by if by is not None else keys, out, band),
            plot_curves(groups, out, band),
        ]
        sheet = contact_sheet(groups, out)
        files = [
            *write_tables(rows, groups, columns, by, out),
            *plots,
            sheet,
            write_html(
                groups,
                rows,
                columns,
                by,
                out,
                title=title,
                plots=[*plots, sheet],
                notes=_notes(filter_string, iwae_key(runs), grouping_label(by) if logged else None),
                film_budget_mb=film_budget_mb,
            ),
        ]
    files.append(_summary(groups, by, out))
    if logged:
        for path in files:
            client.log_artifact(top.info.run_id, str(path), "report")
        n = log_groups(client, top.info.run_id, groups, by, iwae_key(runs), workers)
        log.info("logged %d group metric points to parent run %s", n, top.info.run_id)
    films = out / FILMS
    if films.is_dir():
        files += sorted(films.iterdir())  # written beside the page, never logged
    return files


def _notes(filter_string: str | None, iwae: str | None, logged_grouping: str | None) -> list[str]:
    """`logged_grouping`: the grouping of the group metrics this report logs to the parent run;
    None if it logs none."""
    notes = []
    if logged_grouping:
        notes.append(
            f"The parent run's group metrics are this report's ({KEYS_TAG}: {logged_grouping}); "
            "any of an earlier grouping are superseded: their latest value is NaN."
        )
    if filter_string:
        notes.append(f"Runs matching the MLflow filter: {filter_string}")
    if iwae:
        notes.append(f"IWAE bound: {iwae}, the importance-weighted bound on the test NLL.")
    return notes


def _summary(groups: list[Group], by: list[str] | None, out: Path) -> Path:
    """summary.json: each run's status and final metrics; grouped, each group's statistics."""
    summary = {
        "grouped_by": by,
        "runs": {
            r.run_id: {"name": r.name, "status": r.status, **r.metrics}
            for g in groups
            for r in g.members
        },
        "groups": {
            g.label: {
                "runs": [r.run_id for r in g.members],
                "representative": g.representative.run_id,
                "left_out": g.problems(),
                **g.stats,
            }
            for g in groups
        }
        if by is not None
        else {},
    }
    path = out / "summary.json"
    path.write_text(json.dumps(summary, indent=1))
    return path


def best_group(client: MlflowClient, parent: str, summary: Path) -> str | None:
    """Over seeds, the setting to believe is the group with the best mean, not the luckiest run:
    say it (from the report's summary) and tag the parent with it. None if runs were not
    grouped."""
    try:
        data = json.loads(summary.read_text())
    except (OSError, ValueError):
        return None
    groups = {k: g for k, g in data.get("groups", {}).items() if g.get("test/loss", {}).get("n")}
    if not data.get("grouped_by") or not groups:
        return None
    label, group = min(groups.items(), key=lambda kv: kv[1]["test/loss"]["mean"])
    loss = group["test/loss"]
    client.set_tag(parent, "best_group", label)
    spread = f" ± {loss['std']:.2f}" if "std" in loss else ""
    return (
        f"best setting {label}: test loss {loss['mean']:.2f}{spread} nats per image, mean over "
        f"{int(loss['n'])} runs"
    )
