"""The report's one HTML page, rendered from templates/report.html.j2 (autoescaped).

The page is self-contained, so the MLflow UI can show it inline (it renders an artifact's HTML
from a blob, where no relative link resolves): plots and final frames are embedded as data URIs,
and so are the films up to a budget, representatives first. Films past the budget are copied
beside the page (`films/`) and linked; inside the MLflow UI those show their final frame.
Every film is attached only when it scrolls into view, so a page of hundreds stays responsive.
"""

from __future__ import annotations

import base64
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2

from vaeexp.compare.groups import GROUP_METRICS, Group
from vaeexp.compare.runs import Row
from vaeexp.compare.tables import group_columns, num, run_cells, run_columns

TEMPLATES = Path(__file__).with_name("templates")
FILMS = "films"  # beside the page: the films past the budget


def _env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def data_uri(path: Path, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def place_films(groups: list[Group], out: Path, budget_bytes: int) -> dict[str, str]:
    """run id -> where its film is: a data URI while the budget lasts (each group's
    representative first, in the groups' order), else a copy in films/ beside the page."""
    order = [g.representative for g in groups] + [r for g in groups for r in g.others]
    used, where = 0, {}
    for row in order:
        if row.film is None:
            continue
        size = row.film.stat().st_size
        if used + size <= budget_bytes:
            where[row.run_id] = data_uri(row.film, "image/gif")
            used += size
        else:
            (out / FILMS).mkdir(exist_ok=True)
            shutil.move(row.film, out / FILMS / f"{row.run_id}.gif")  # a temporary download
            where[row.run_id] = f"{FILMS}/{row.run_id}.gif"
    return where


def _card(row: Row, key: int, caption: str, films: dict[str, str]) -> dict[str, Any]:
    return {
        "key": key,
        "run_id": row.run_id,
        "name": row.name,
        "caption": caption,
        "status": row.status.lower(),
        "film": films.get(row.run_id, ""),
        "frame": data_uri(row.frame, "image/png") if row.frame is not None else "",
    }


def _terms(recon: float | None, kl: float | None) -> str:
    """'; recon 480.12, KL 12.30': a film's caption shows what the loss is made of, so a sweep
    of the KL weight shows the trade it makes."""
    return f"; recon {recon:.2f}, KL {kl:.2f}" if recon is not None and kl is not None else ""


def _group_stat(group: Group) -> str:
    mean, std = group.stat("test/loss", "mean"), group.stat("test/loss", "std")
    if mean is None:
        return "no run finished"
    spread = f" ± {std:.2f}" if std is not None else ""
    terms = _terms(group.stat("test/recon", "mean"), group.stat("test/kl", "mean"))
    return f"test loss {mean:.2f}{spread} (n={len(group.finished)}){terms}"


def _table(head: list[str], body: list[tuple[int, str, list[dict]]], numeric: set[int]) -> dict:
    return {
        "head": [{"text": h, "num": i in numeric} for i, h in enumerate(head)],
        "rows": [
            {"key": k, "cls": cls, "cells": [{"text": c["v"], "sub": ""} | c for c in cells]}
            for k, cls, cells in body
        ],
    }


def _numeric(head: list[str], body: list[list[str]], text_cols: int) -> set[int]:
    return {
        j
        for j in range(text_cols, len(head))
        if all(_is_number(line[j]) for line in body if line[j])
    }


def group_table(groups: list[Group], by: list[str]) -> dict:
    head = group_columns(by)
    body = []
    for i, g in enumerate(groups):
        cells = [{"v": g.label, "text": g.label}, {"v": str(len(g.members))}]
        cells += [{"v": str(len(g.finished))}, {"v": g.problems()}]
        cells += [{"v": g.values.get(k, "")} for k in by]
        for m in GROUP_METRICS:
            mean, std = g.stat(m, "mean"), g.stat(m, "std")
            text = "" if mean is None else num(mean) + (f" ± {num(std)}" if std is not None else "")
            n = g.stat(m, "n") or 0
            sub = f"{num(g.stat(m, 'min'))}-{num(g.stat(m, 'max'))}" if n > 1 else ""
            cells.append({"v": num(mean, 6), "text": text, "sub": sub})
        cls = "bad" if g.problems() else ""
        body.append((i, cls, cells))
    values = [[c["v"] for c in cells] for _, _, cells in body]
    return _table(head, body, {1, 2} | _numeric(head, values, 4))


def run_table(rows: list[Row], keys: list[str], label: dict[str, str], key: dict[str, int]):
    grouped = bool(label)
    head = run_columns(keys, grouped)
    lines = [run_cells(r, keys, label.get(r.run_id) if grouped else None) for r in rows]
    body = [
        (key[r.run_id], r.status.lower(), [{"v": c} for c in line])
        for r, line in zip(rows, lines, strict=True)
    ]
    numeric = _numeric(head[: len(head) - grouped], lines, 2)
    return _table(head, body, numeric)


def write_html(
    groups: list[Group],
    rows: list[Row],
    keys: list[str],
    by: list[str] | None,
    out: Path,
    *,
    title: str,
    plots: list[Path],
    notes: list[str],
    film_budget_mb: float,
) -> Path:
    films = place_films(groups, out, int(film_budget_mb * 2**20))
    beside = sum(not src.startswith("data:") for src in films.values())
    if beside:
        notes = [
            *notes,
            f"{beside} of {len(films)} films are past the {film_budget_mb:g} MB embedding budget: "
            f"they are files in {FILMS}/ beside this page, shown when it is opened from its "
            "folder (elsewhere, such as the MLflow UI, their final frame is shown instead).",
        ]
    rest = [k for k in keys if by is None or k not in by]  # what tells a group's runs apart

    def who(row: Row) -> str:
        return ", ".join(f"{k}={row.values[k]}" for k in rest) or row.name

    key = {r.run_id: i for i, g in enumerate(groups) for r in g.members}
    label = {r.run_id: g.label for g in groups for r in g.members} if by is not None else {}
    cards = []
    for i, g in enumerate(groups):
        rep = g.representative
        caption = g.label if by is not None else ", ".join(f"{k}={v}" for k, v in g.values.items())
        card = _card(rep, i, caption or rep.name, films) | {
            "who": ("median run: " if g.finished else "shown: ") + who(rep)
        }
        card |= {"stat": _group_stat(g) if by is not None else _run_stat(rep), "bad": g.problems()}
        card["others"] = [_card(r, i, who(r), films) | {"stat": _run_stat(r)} for r in g.others]
        cards.append(card)
    page = (
        _env()
        .get_template("report.html.j2")
        .render(
            title=title,
            generated=f"{datetime.now():%Y-%m-%d %H:%M}",
            n_runs=len(rows),
            by=by,
            groups=group_table(groups, by) if by is not None else None,
            runs=run_table(rows, keys, label, key),
            cards=cards,
            plots=[{"src": data_uri(p, "image/png"), "alt": p.stem} for p in plots],
            notes=notes,
        )
    )
    path = out / "report.html"
    path.write_text(page)
    return path


def _run_stat(row: Row) -> str:
    loss = row.metrics.get("test/loss")
    if row.status != "FINISHED" or loss is None:
        return ""
    terms = _terms(row.metrics.get("test/recon"), row.metrics.get("test/kl"))
    return f"test loss {loss:.2f}{terms}"
