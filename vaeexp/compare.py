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

import argparse
import base64
import csv
import html
import json
import logging
import math
import os
import shlex
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import mlflow
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from PIL import Image, ImageDraw

from vaeexp.config import default_tracking_uri, runs_dir
from vaeexp.film.render import font as text_font
from vaeexp.sweep import PARENT_FILE
from vaeexp.tracking import NOT_IN_NAME

log = logging.getLogger(__name__)

METRICS = ("test/loss", "test/recon", "test/kl")
CELL = (320, 240)  # a contact-sheet cell: a latent frame at half size


@dataclass
class Row:
    run_id: str
    name: str
    status: str  # FINISHED, FAILED, KILLED, RUNNING; DIVERGED for a FAILED run that diverged
    values: dict[str, str]
    metrics: dict[str, float]
    epochs: int
    wall_s: float | None
    curve: list[tuple[int, float]] = field(default_factory=list)
    frame: Path | None = None  # the final latent frame
    film: Path | None = None  # latent.gif


def runs_for(client: MlflowClient, *, parent: str | None = None, experiment: str | None = None):
    """(the parent run or None, the runs to compare) for a sweep's parent or a whole experiment."""
    if parent:
        top = client.get_run(parent)
        runs = client.search_runs(
            [top.info.experiment_id],
            f"tags.mlflow.parentRunId = '{parent}'",
            max_results=5000,
        )
        return top, runs
    exp = client.get_experiment_by_name(experiment or "vaeexp")
    if exp is None:
        raise LookupError(f"no experiment named {experiment!r}")
    runs = client.search_runs([exp.experiment_id], max_results=5000)
    parents = {r.data.tags.get("mlflow.parentRunId") for r in runs}
    return None, [r for r in runs if r.info.run_id not in parents]  # sweeps' parents: not runs


def overrides_of(run: Run) -> dict[str, str]:
    text = run.data.tags.get("hydra_overrides", "")
    pairs = [o.lstrip("+~").split("=", 1) for o in shlex.split(text) if "=" in o]
    return {k: v for k, v in pairs if not k.startswith(NOT_IN_NAME)}


def swept_keys(runs: list[Run]) -> list[str]:
    """The settings that differ between the runs, in the order they were given."""
    keys: list[str] = []
    for run in runs:
        keys += [k for k in overrides_of(run) if k not in keys]
    values = [{**{k: None for k in keys}, **overrides_of(r)} for r in runs]
    return [k for k in keys if len({v[k] for v in values}) > 1] or keys


def collect(client: MlflowClient, runs: list[Run], keys: list[str], folder: Path) -> list[Row]:
    rows = []
    for run in runs:
        info, data = run.info, run.data
        status = info.status
        if status == "FAILED" and data.tags.get("diverged") == "true":
            status = "DIVERGED"
        end = info.end_time or None
        wall = (end - info.start_time) / 1000 if end and info.start_time else None
        values = {**{k: "" for k in keys}, **overrides_of(run)}
        row = Row(
            run_id=info.run_id,
            name=info.run_name or info.run_id[:8],
            status=status,
            values={k: values[k] for k in keys},
            metrics={
                k: v for k, v in data.metrics.items() if k in METRICS or k.startswith("test_nll")
            },
            epochs=int(data.metrics.get("epoch", 0)),
            wall_s=wall,
            curve=sorted(
                (m.step, m.value) for m in client.get_metric_history(info.run_id, "test/loss")
            ),
        )
        row.frame, row.film = _film_files(client, info.run_id, folder / info.run_id)
        rows.append(row)
    rows.sort(key=lambda r: (r.metrics.get("test/loss", math.inf), r.name))
    return rows


def _film_files(client: MlflowClient, run_id: str, into: Path) -> tuple[Path | None, Path | None]:
    """The run's last latent frame (from MLflow's image slider) and its GIF, if it has them."""
    into.mkdir(parents=True, exist_ok=True)
    frame = film = None
    try:
        images = [f.path for f in client.list_artifacts(run_id, "images")]
        latent = [p for p in images if p.startswith("images/latent+step+") and p.endswith(".png")]
        if latent:
            last = max(latent, key=lambda p: int(p.split("+")[2]))
            frame = Path(client.download_artifacts(run_id, last, str(into)))
        if any(f.path == "film/latent.gif" for f in client.list_artifacts(run_id, "film")):
            film = Path(client.download_artifacts(run_id, "film/latent.gif", str(into)))
    except (mlflow.exceptions.MlflowException, OSError) as e:
        log.warning("run %s: its film could not be read (%s)", run_id, e)
    return frame, film


# ---- the outputs ---------------------------------------------------------------------------


def columns(keys: list[str]) -> list[str]:
    return ["run", "status", *keys, "test loss", "test recon", "test KL", "epochs", "wall (s)"]


def cells(row: Row, keys: list[str]) -> list[str]:
    def num(key: str) -> str:
        v = row.metrics.get(key)
        return "" if v is None else f"{v:.2f}"

    wall = "" if row.wall_s is None else f"{row.wall_s:.1f}"
    metrics = [num(k) for k in METRICS]
    return [row.name, row.status, *(row.values[k] for k in keys), *metrics, str(row.epochs), wall]


def write_tables(rows: list[Row], keys: list[str], out: Path) -> list[Path]:
    head = columns(keys)
    body = [cells(r, keys) for r in rows]
    md = out / "runs.md"
    md.write_text(
        "\n".join(
            [
                "| " + " | ".join(head) + " |",
                "|" + " --- |" * len(head),
                *("| " + " | ".join(c.replace("|", "\\|") for c in line) + " |" for line in body),
            ]
        )
        + "\n"
    )
    path = out / "runs.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run_id", *head])
        writer.writerows([r.run_id, *line] for r, line in zip(rows, body, strict=True))
    return [md, path]


def _axis(values: list[str]) -> tuple[list[float], list[str] | None, bool]:
    """Positions for a swept setting's values: numbers as they are (log scale when they span a
    wide positive range), anything else as evenly spaced categories."""
    try:
        nums = [float(v) for v in values]
    except ValueError:
        order = sorted(set(values))
        return [float(order.index(v)) for v in values], order, False
    positive = [n for n in nums if n > 0]
    wide = len(positive) == len(nums) and max(nums) / min(nums) >= 20
    return nums, None, wide


def plot_loss_vs_values(rows: list[Row], keys: list[str], out: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = keys or ["run"]
    fig = Figure(figsize=(4.2 * len(keys), 3.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ok = [r for r in rows if "test/loss" in r.metrics and r.status == "FINISHED"]
    top = max((r.metrics["test/loss"] for r in ok), default=1.0)
    for i, key in enumerate(keys):
        ax = fig.add_subplot(1, len(keys), i + 1)
        values = [r.values.get(key, r.name) for r in rows]
        x, categories, log_x = _axis(values)
        for row, xi in zip(rows, x, strict=True):
            if row in ok:
                ax.plot(xi, row.metrics["test/loss"], "o", color="tab:blue")
            else:  # failed and diverged runs: a red cross above the finished ones
                ax.plot(xi, top, "x", color="tab:red", ms=9)
        if categories is not None:
            ax.set_xticks(range(len(categories)), categories, rotation=30)
        if log_x:
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel("final test loss (nats)")
    if len(ok) < len(rows):
        fig.suptitle("red x: failed or diverged", fontsize=9)
    path = out / "test_loss_vs_values.png"
    fig.savefig(path)
    return path


def plot_curves(rows: list[Row], out: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for row in rows:
        if row.curve:
            steps, values = zip(*row.curve, strict=True)
            style = "-" if row.status == "FINISHED" else ":"
            ax.plot(steps, values, style, marker=".", label=f"{row.name} ({row.status.lower()})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test loss (nats)")
    if any(r.curve for r in rows):
        ax.legend(fontsize=7, loc="upper right")
    path = out / "learning_curves.png"
    fig.savefig(path)
    return path


def contact_sheet(rows: list[Row], keys: list[str], out: Path) -> Path:
    cols = min(4, max(1, len(rows)))
    caption = 36
    w, h = CELL
    sheet = Image.new("RGB", (cols * w, -(-len(rows) // cols) * (h + caption)), "white")
    draw = ImageDraw.Draw(sheet)
    font = text_font()
    for i, row in enumerate(rows):
        x, y = (i % cols) * w, (i // cols) * (h + caption)
        label = ", ".join(f"{k}={row.values[k]}" for k in keys) or row.name
        draw.text((x + 6, y + 2), label[:44], fill="black", font=font)
        loss = row.metrics.get("test/loss")
        status = f"test loss {loss:.2f}" if row.status == "FINISHED" and loss else row.status
        draw.text(
            (x + 6, y + 18), status, fill="black" if row.status == "FINISHED" else "red", font=font
        )
        if row.frame is not None:
            with Image.open(row.frame) as frame:
                sheet.paste(
                    frame.convert("RGB").resize(CELL, Image.Resampling.LANCZOS), (x, y + caption)
                )
        else:
            draw.text((x + w // 3, y + caption + h // 2), "no latent frame", fill="grey", font=font)
    path = out / "contact_sheet.png"
    sheet.save(path)
    return path


def _data_uri(path: Path, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def write_html(rows: list[Row], keys: list[str], out: Path, title: str, plots: list[Path]) -> Path:
    head = columns(keys)
    numeric = {i for i, c in enumerate(head) if c not in ("run", "status", *keys)}
    numeric |= {
        2 + i
        for i, k in enumerate(keys)
        if all(_is_number(r.values[k]) for r in rows if r.values[k])
    }
    esc = html.escape
    table_rows = []
    films = []
    for i, row in enumerate(rows):
        tds = "".join(
            f'<td data-v="{esc(c)}" class="{"num" if j in numeric else ""}">{esc(c)}</td>'
            for j, c in enumerate(cells(row, keys))
        )
        table_rows.append(f'<tr data-run="{i}" class="{row.status.lower()}">{tds}</tr>')
        label = esc(", ".join(f"{k}={row.values[k]}" for k in keys) or row.name)
        if row.film is not None:
            media = f'<img src="{_data_uri(row.film, "image/gif")}" alt="latent film of {label}">'
        elif row.frame is not None:
            media = f'<img src="{_data_uri(row.frame, "image/png")}" alt="last frame of {label}">'
        else:
            media = '<div class="none">no film</div>'
        films.append(
            f'<figure data-run="{i}">{media}<figcaption>{label}<br>'
            f"<b>{esc(row.status.lower())}</b> {esc(cells(row, keys)[len(keys) + 2])}"
            "</figcaption></figure>"
        )
    ths = "".join(
        f'<th data-col="{j}" data-num="{int(j in numeric)}">{esc(c)}</th>'
        for j, c in enumerate(head)
    )
    images = "".join(f'<img src="{_data_uri(p, "image/png")}" alt="{esc(p.stem)}">' for p in plots)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 1.5em; }}
table {{ border-collapse: collapse; }} td, th {{ padding: 3px 8px; border-bottom: 1px solid #ddd; }}
th {{ cursor: pointer; background: #f4f4f4; }} th.asc::after {{ content: " ▲"; }}
th.desc::after {{ content: " ▼"; }} td.num {{ text-align: right; }}
tr.failed, tr.diverged, tr.killed {{ color: #b00; }}
#films {{ display: flex; flex-wrap: wrap; gap: 10px; }} figure {{ margin: 0; width: 330px; }}
figure img {{ width: 320px; }} .none {{ width: 320px; height: 240px; background: #eee; }}
.plots img {{ max-width: 100%; margin: 6px 0; display: block; }}
</style></head>
<body>
<h1>{esc(title)}</h1>
<p>{len(rows)} runs; click a column to sort the table and the films. Generated
{datetime.now():%Y-%m-%d %H:%M} by <code>python -m vaeexp.compare</code>.</p>
<table id="runs"><thead><tr>{ths}</tr></thead><tbody>{"".join(table_rows)}</tbody></table>
<h2>Latent films</h2>
<div id="films">{"".join(films)}</div>
<h2>Plots</h2>
<div class="plots">{images}</div>
<script>
const body = document.querySelector("#runs tbody"), films = document.querySelector("#films");
document.querySelectorAll("#runs th").forEach(th => th.addEventListener("click", () => {{
  const col = +th.dataset.col, num = th.dataset.num === "1";
  const dir = th.classList.contains("asc") ? -1 : 1;
  document.querySelectorAll("#runs th").forEach(h => h.classList.remove("asc", "desc"));
  th.classList.add(dir > 0 ? "asc" : "desc");
  const key = tr => tr.children[col].dataset.v;
  const rows = [...body.rows].sort((a, b) => {{
    const x = key(a), y = key(b);
    if (num) {{ const p = x === "" ? Infinity : +x, q = y === "" ? Infinity : +y;
      return dir * (p - q); }}
    return dir * x.localeCompare(y);
  }});
  rows.forEach(tr => {{ body.appendChild(tr);
    films.appendChild(films.querySelector(`figure[data-run="${{tr.dataset.run}}"]`)); }});
}}));
window.addEventListener("load", () => {{
  const imgs = [...document.images];
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.imagesLoaded = `${{ok}}/${{imgs.length}}`;
}});
</script>
</body></html>
"""
    path = out / "report.html"
    path.write_text(page)
    return path


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


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


def parent_of_sweep(folder: Path) -> str:
    path = folder / PARENT_FILE
    if not path.is_file():
        raise LookupError(
            f"{folder}: no {PARENT_FILE} here; is this a sweep folder (runs/multirun/...)?"
        )
    return path.read_text().strip()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vaeexp.compare", description=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--sweep", type=Path, help="a sweep folder (runs/multirun/<date>/<time>)")
    source.add_argument("--parent", help="a sweep's parent run id")
    source.add_argument("--experiment", help="every run of an MLflow experiment")
    parser.add_argument("--out", type=Path, help="where to write (default: the sweep's report/)")
    parser.add_argument("--uri", default=default_tracking_uri(), help="tracking store")
    parser.add_argument("--no-log", action="store_true", help="do not log to the parent run")
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    client = MlflowClient(args.uri)
    try:
        parent = parent_of_sweep(args.sweep) if args.sweep else args.parent
        out = args.out or (
            args.sweep / "report"
            if args.sweep
            else runs_dir() / "reports" / (parent or args.experiment)
        )
        files = report(
            client, out, parent=parent, experiment=args.experiment, log_to_parent=not args.no_log
        )
    except (LookupError, mlflow.exceptions.MlflowException) as e:
        sys.exit(f"vaeexp.compare: error: {str(e).splitlines()[0]}")
    print(f"vaeexp.compare: wrote {len(files)} files to {out}; open {out / 'report.html'}")


if __name__ == "__main__":
    main()
