"""`python -m vaeexp.compare`: what each setting of a sweep did, at a glance.

    python -m vaeexp.compare --sweep runs/multirun/2026-11-24/10-00-00.000000
    python -m vaeexp.compare --parent <the sweep's parent run id>
    python -m vaeexp.compare --experiment vaeexp

Writes a table (Markdown and CSV) of the runs with their swept values, final test loss / recon /
KL, epochs and wall time; final test loss against each swept value; every run's test loss curve
overlaid; a contact sheet of every run's final latent frame; and one self-contained HTML page
with all of it, sortable by any column, in which every run's latent film plays side by side.
Logged to the sweep's parent run under `report/` (the MLflow UI shows the HTML inline).
Failed and diverged runs are listed as such, never dropped. Everything is read through
MLflow's client, so it works on any store, a server included.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from mlflow.tracking import MlflowClient

from vaeexp.compare.figures import contact_sheet, plot_curves, plot_loss_vs_values
from vaeexp.compare.page import write_html, write_tables
from vaeexp.compare.runs import collect, parent_of_sweep, runs_for, swept_keys

__all__ = ["parent_of_sweep", "report"]


def report(
    client: MlflowClient,
    out: Path,
    *,
    parent: str | None = None,
    experiment: str | None = None,
    log_to_parent: bool = True,
) -> list[Path]:
    """Write the report into `out`; log it to the sweep's parent run. Returns the files."""
    top, runs = runs_for(client, parent=parent, experiment=experiment)
    if not runs:
        raise LookupError("no runs to compare" + (f" under parent {parent}" if parent else ""))
    keys = swept_keys(runs)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        rows = collect(client, runs, keys, Path(tmp))
        title = f"vaeexp: {top.info.run_name}" if top else f"vaeexp: experiment {experiment}"
        plots = [plot_loss_vs_values(rows, keys, out), plot_curves(rows, out)]
        sheet = contact_sheet(rows, keys, out)
        files = [
            *write_tables(rows, keys, out),
            *plots,
            sheet,
            write_html(rows, keys, out, title, [*plots, sheet]),
        ]
    summary = {r.name: {"status": r.status, **r.metrics} for r in rows}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    files.append(out / "summary.json")
    if top is not None and log_to_parent:
        for path in files:
            client.log_artifact(top.info.run_id, str(path), "report")
    return files
