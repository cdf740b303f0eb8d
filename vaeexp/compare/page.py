"""The report's tables (Markdown, CSV) and its one self-contained HTML page."""

from __future__ import annotations

import base64
import csv
import html
from datetime import datetime
from pathlib import Path

from vaeexp.compare.runs import METRICS, Row


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
