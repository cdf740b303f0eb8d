"""The report's pictures: final test loss against each swept value, every run's test-loss
curve, and a contact sheet of every run's final latent frame."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from vaeexp.compare.runs import Row
from vaeexp.film.render import font as text_font

CELL = (320, 240)  # a contact-sheet cell: a latent frame at half size


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
