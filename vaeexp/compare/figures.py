"""The report's pictures: final test loss against each setting (a group's mean and spread over
its seeds), each group's test-loss curve with a band, and a contact sheet of each group's
representative final latent frame."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from vaeexp.compare.groups import Group, band
from vaeexp.film.render import font as text_font

CELL = (320, 240)  # a contact-sheet cell: a latent frame at half size
LEGEND_MAX = 12  # more groups than this: no legend (the table names them)


def _figure(size: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _axis(values: list[str]) -> tuple[list[float], list[str] | None, bool]:
    """Positions for a setting's values: numbers as they are (log scale when they span a wide
    positive range), anything else as evenly spaced categories."""
    try:
        nums = [float(v) for v in values]
    except ValueError:
        order = sorted(set(values))
        return [float(order.index(v)) for v in values], order, False
    positive = [n for n in nums if n > 0]
    wide = len(positive) == len(nums) and max(nums) / min(nums) >= 20
    return nums, None, wide


def plot_loss_vs_values(groups: list[Group], keys: list[str], out: Path, spread: str) -> Path:
    """Each group's mean final test loss (error bar: its spread) against each setting, each run
    a small grey dot behind it; groups with no finished run as a red cross at the top."""
    import numpy as np

    keys = keys or ["group"]
    fig = _figure((4.2 * len(keys), 3.6))
    done = [g for g in groups if g.stat("test/loss", "mean") is not None]
    means = np.array([g.stat("test/loss", "mean") for g in done])
    spreads = np.array([_spread(g, spread) for g in done]).reshape(-1, 2)
    runs = [(i, r.metrics["test/loss"]) for i, g in enumerate(done) for r in g.finished]
    top = means.max() if len(means) else 1.0
    for i, key in enumerate(keys):
        ax = fig.add_subplot(1, len(keys), i + 1)
        x, categories, log_x = _axis([g.values.get(key, g.label) for g in groups])
        x_of = dict(zip(map(id, groups), x, strict=True))
        xs = np.array([x_of[id(g)] for g in done])
        if runs:
            ax.plot([xs[j] for j, _ in runs], [v for _, v in runs], ".", color="0.6", ms=4)
            yerr = np.stack([means - spreads[:, 0], spreads[:, 1] - means])
            ax.errorbar(xs, means, yerr=yerr, fmt="o", color="tab:blue", capsize=3)
        bad = [j for j, g in enumerate(done) if g.problems()]
        ax.plot(xs[bad], means[bad], "o", mfc="none", mec="tab:red", ms=11)
        failed = [x_of[id(g)] for g in groups if g.stat("test/loss", "mean") is None]
        ax.plot(failed, [top] * len(failed), "x", color="tab:red", ms=9)
        if categories is not None:
            ax.set_xticks(range(len(categories)), categories, rotation=30)
        if log_x:
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel("final test loss (nats)")
    what = "mean and min-max" if spread == "minmax" else "mean +- 1 std"
    fig.suptitle(
        f"blue: {what} of finished runs\ngrey: each run; red: failed or diverged runs",
        fontsize=9,
    )
    path = out / "test_loss_vs_values.png"
    fig.savefig(path)
    return path


def _spread(group: Group, spread: str) -> tuple[float, float]:
    """(low, high) of the group's final test loss: min and max, or mean -+ std (0 for n=1)."""
    mean = group.stat("test/loss", "mean") or 0.0
    if spread == "minmax":
        low, high = group.stat("test/loss", "min"), group.stat("test/loss", "max")
        return (mean if low is None else low), (mean if high is None else high)
    std = group.stat("test/loss", "std") or 0.0
    return mean - std, mean + std


def plot_curves(groups: list[Group], out: Path, spread: str) -> Path:
    """One mean test-loss line per group over its finished runs, shaded over its spread;
    failed and diverged runs dotted, as far as they got."""
    fig = _figure((8, 4.5))
    ax = fig.add_subplot()
    for i, group in enumerate(groups):
        colour = f"C{i % 10}"
        curve = band(group, spread)
        n = len(group.finished)
        if curve is not None:
            steps, mean, low, high = curve
            ax.plot(
                steps,
                mean,
                "-",
                marker="." if len(steps) < 30 else None,
                color=colour,
                label=f"{group.label} (n={n})",
            )
            if n > 1:
                ax.fill_between(steps, low, high, color=colour, alpha=0.2, linewidth=0)
        for row in group.members:
            if not row.ok and row.curve:
                steps, values = zip(*row.curve, strict=True)
                ax.plot(
                    steps, values, ":", color=colour, label=f"{row.name} ({row.status.lower()})"
                )
    ax.set_xlabel("epoch")
    ax.set_ylabel("test loss (nats)")
    what = "min to max" if spread == "minmax" else "mean +- 1 std"
    ax.set_title(f"mean over each group's finished runs; band: {what}", fontsize=9)
    if 0 < len(groups) <= LEGEND_MAX and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper right")
    path = out / "learning_curves.png"
    fig.savefig(path)
    return path


def contact_sheet(groups: list[Group], out: Path) -> Path:
    """Each group's representative (median) run's final latent frame, captioned."""
    cols = min(4, max(1, len(groups)))
    caption = 36
    w, h = CELL
    sheet = Image.new("RGB", (cols * w, -(-len(groups) // cols) * (h + caption)), "white")
    draw = ImageDraw.Draw(sheet)
    font = text_font()
    for i, group in enumerate(groups):
        x, y = (i % cols) * w, (i // cols) * (h + caption)
        row = group.representative
        draw.text((x + 6, y + 2), group.label[:44], fill="black", font=font)
        mean, std = group.stat("test/loss", "mean"), group.stat("test/loss", "std")
        if mean is None:
            status = row.status
        elif len(group.members) == 1:
            status = f"test loss {mean:.2f}"
        else:
            spread = f" ± {std:.2f}" if std is not None else ""
            status = f"loss {mean:.2f}{spread}, n={len(group.finished)} (median run)"
        bad = mean is None or group.problems()
        draw.text((x + 6, y + 18), status, fill="red" if bad else "black", font=font)
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
