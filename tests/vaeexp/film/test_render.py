"""The film's renderer (vaeexp.film.render), in-process: palette, where points land (to the
pixel), the axes of a whole film, the projection's fit and its fixed PCA basis, the decoder film's
title strip, and the GIF writer."""

from __future__ import annotations

import numpy as np
from PIL import Image

from vaeexp.film.render import (
    DISC,
    GREYS,
    SIZE,
    TAB10,
    TITLE_HEIGHT,
    Canvas,
    GifWriter,
    Projection,
    draw_film,
    fit_limits,
    grey_palette,
    jitter_for,
    title_strip,
)

NAMES = [str(d) for d in range(10)]


def indices(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


def centre(image: Image.Image, colour: int) -> np.ndarray:
    """(row, column) of the middle of a class colour's pixels."""
    rows, cols = np.nonzero(indices(image) == colour)
    assert len(rows), f"colour {colour} not drawn"
    return np.array([rows.mean(), cols.mean()])


def test_a_frame_is_a_palette_image_with_the_class_colours():
    canvas = Canvas(NAMES, (-10, 10), (-10, 10), ("z[0]", "z[1]"))
    labels = np.array([*range(10), 13])  # class 13 wraps to colour 3
    xy = np.stack([np.linspace(-8, 8, 11), np.zeros(11)], axis=1)
    image = canvas.render(xy, labels, "epoch 1")
    assert image.mode == "P" and image.size == SIZE
    palette = np.array(image.getpalette()[: 3 * (10 + GREYS)], np.uint8).reshape(-1, 3)
    assert (palette[:10] == TAB10).all()  # indices 0-9: the classes
    assert (palette[10:] == np.linspace(0, 255, GREYS).round()[:, None]).all()  # the title's
    counts = np.bincount(indices(image).reshape(-1), minlength=256)
    assert counts[:10].tolist() == [len(DISC)] * 3 + [2 * len(DISC)] + [len(DISC)] * 6
    assert counts[10 : 10 + GREYS].sum() > 0  # the title is written in the greys
    top = indices(image)[:TITLE_HEIGHT]
    assert (top >= 10).all()  # no point drawn over the title


def test_points_land_on_the_side_their_values_say():
    canvas = Canvas(NAMES, (0, 100), (-1, 1), ("z[0]", "z[1]"))  # not centred on 0
    xy = np.array([[90, 0], [10, 0], [50, 0.8], [50, -0.8]], np.float32)
    image = canvas.render(xy, np.array([1, 2, 3, 4]), "t")
    right, left, up, down = (centre(image, c) for c in (1, 2, 3, 4))
    assert right[1] > left[1] + 300 and abs(right[0] - left[0]) < 0.5  # +x to the right
    assert up[0] < down[0] - 300 and abs(up[1] - down[1]) < 0.5  # +y up (rows grow down)
    assert abs(up[1] - (left[1] + right[1]) / 2) < 1  # x = 50: midway between 10 and 90


def test_a_later_point_covers_an_earlier_one():
    canvas = Canvas(NAMES, (-10, 10), (-10, 10), ("z[0]", "z[1]"))
    image = canvas.render(np.zeros((2, 2), np.float32), np.array([1, 2]), "t")
    counts = np.bincount(indices(image).reshape(-1), minlength=10)
    assert counts[1] == 0 and counts[2] == len(DISC)


def test_points_off_the_axes_are_left_out_and_counted_in_the_title():
    canvas = Canvas(NAMES, (-10, 10), (-10, 10), ("z[0]", "z[1]"))
    xy = np.array([[50, 0], [0, -10], [np.nan, 1], [0, np.inf]], np.float32)
    off = canvas.render(xy, np.arange(4), "step 3")
    none = np.zeros((0, 2), np.float32), np.zeros(0, int)
    assert np.array_equal(indices(off), indices(canvas.render(*none, "step 3  (4 off the axes)")))
    assert not np.array_equal(indices(off), indices(canvas.render(*none, "step 3")))


def test_fixed_limits_and_the_class_axis():
    labels = np.arange(10).repeat(3)
    means = [np.zeros((30, 2))]
    assert fit_limits(means, Projection("identity"), labels, "10") == ((-10, 10), (-10, 10))
    by_class = Projection("value_by_class")
    assert fit_limits([np.zeros((30, 1))], by_class, labels, "3") == ((-3, 3), (-0.6, 9.6))
    wide = [np.full((30, 1), 50.0)]
    (x0, x1), y = fit_limits(wide, by_class, labels, "auto")
    assert x0 < 50 < x1 and y == (-0.6, 9.6)


def test_auto_limits_hold_every_frame_with_a_margin():
    rng = np.random.default_rng(0)
    labels = np.arange(1000) % 10
    small = rng.uniform(-1, 1, (1000, 2))
    wide_x = np.stack([rng.uniform(-5, 20, 1000), rng.uniform(-2, 3, 1000)], axis=1)
    stray = rng.uniform(-1, 1, (1000, 2))
    stray[0] = (1e4, 0)  # one point far away
    stray[1:4] = np.nan  # a diverged point or three
    (x0, x1), (y0, y1) = fit_limits([small, wide_x, stray], Projection("identity"), labels, "auto")
    for frame in (small, wide_x, stray[4:]):
        assert (frame[:, 0] > x0).all() and (frame[:, 0] < x1).all()
        assert (frame[:, 1] > y0).all() and (frame[:, 1] < y1).all()
    assert -7 < x0 < -5 and 20 < x1 < 22 and -3 < y0 < -2 and 3 < y1 < 4  # a margin, no more
    nothing = np.full((10, 2), np.nan)
    assert fit_limits([nothing], Projection("identity"), labels[:10], "auto") == (
        (-1.1, 1.1),
        (-1.1, 1.1),
    )


def test_draw_film_keeps_one_pca_basis_fitted_on_the_last_finite_frame():
    rng = np.random.default_rng(0)
    n = 200
    labels = np.arange(n) % 10
    along_0 = np.zeros((n, 4))  # spread along z[0] only
    along_0[:, 0] = np.linspace(-5, 5, n)
    along_23 = np.zeros((n, 4))  # spread along z[2] and z[3] only
    along_23[:, 2], along_23[:, 3] = rng.uniform(-5, 5, n), rng.uniform(-2, 2, n)
    diverged = np.full((n, 4), np.nan)
    _, frames = draw_film([along_0, along_23, diverged], labels, ["a", "b", "c"], NAMES, "auto")
    first, last_finite, last = list(frames)

    def spread(image: Image.Image) -> np.ndarray:
        rows, cols = np.nonzero(indices(image) < 10)
        return np.array([np.ptp(rows), np.ptp(cols)]) if len(rows) else np.zeros(2)

    # z[0] is not in the basis of the last finite frame: the first frame is one blob in the
    # middle; a basis refitted per frame, or fitted on the NaN frame, would spread it
    assert spread(first).max() <= 6
    assert (spread(last_finite) > 150).all()
    assert spread(last).max() == 0  # nothing finite to draw


def test_one_dimensional_film_plots_value_against_class_with_fixed_jitter():
    labels = np.arange(10)
    left, right = np.full((10, 1), -2.0), np.full((10, 1), 2.0)
    _, frames = draw_film([left, right], labels, ["a", "b"], NAMES, "5")
    a, b = list(frames)
    rows = [centre(a, c)[0] for c in range(10)]
    assert rows == sorted(rows, reverse=True)  # class 0 at the bottom, class 9 at the top
    for c in range(10):
        assert centre(a, c)[0] == centre(b, c)[0]  # the same jitter in every frame
        assert centre(b, c)[1] > centre(a, c)[1] + 50  # x is the value
    jitter = jitter_for(10)
    assert np.array_equal(jitter, jitter_for(10)) and np.abs(jitter).max() <= 0.35
    assert len(set(jitter.tolist())) == 10
    xy = Projection("value_by_class")(left, labels, jitter)
    assert np.array_equal(xy[:, 1], labels + jitter)


def test_no_finite_points_to_fit_leaves_the_first_two_axes():
    p = Projection.fit(np.full((50, 5), np.inf))
    assert p.kind == "pca" and p.axis_labels() == ("z[0]", "z[1]")
    means = np.arange(15, dtype=np.float32).reshape(3, 5)
    assert np.array_equal(p(means, np.zeros(3), np.zeros(3)), means[:, :2])


def test_decoder_frames_title_strip_and_grey_palette():
    grid = np.arange(56 * 84, dtype=np.uint32).reshape(56, 84).astype(np.uint8)
    framed = title_strip(grid, "epoch 3")
    assert framed.shape == (TITLE_HEIGHT + 56, 84) and framed.dtype == np.uint8
    assert np.array_equal(framed[TITLE_HEIGHT:], grid)
    strip = framed[:TITLE_HEIGHT]
    assert (strip < 128).any() and (strip == 255).mean() > 0.7  # dark text on white
    assert not np.array_equal(strip, title_strip(grid, "epoch 4")[:TITLE_HEIGHT])
    palette = grey_palette()
    assert len(palette) == 768
    image = Image.fromarray(framed, "P")
    image.putpalette(palette)  # as the decoder GIF does: index i is grey level i
    assert np.array_equal(np.asarray(image.convert("L")), framed)


def gif_frames(path) -> int:
    with Image.open(path) as gif:
        return gif.n_frames


def test_pca_is_fitted_once_and_labels_its_axes():
    rng = np.random.default_rng(0)
    last = rng.normal(size=(500, 8)) * np.array([5, 0.1, 2, 0.1, 0.1, 0.1, 0.1, 0.1])
    p = Projection.fit(last)
    assert p.kind == "pca" and p.explained[0] > 0.8 > p.explained[1] > 0.1
    xy = p(last, np.zeros(500), np.zeros(500))
    assert abs(np.corrcoef(xy[:, 0], last[:, 0])[0, 1]) > 0.99  # PC1: the widest axis
    assert abs(np.corrcoef(xy[:, 1], last[:, 2])[0, 1]) > 0.99
    assert p.axis_labels()[0].startswith("PC1 (")
    assert Projection.fit(last[:, :2]).kind == "identity"
    assert Projection.fit(last[:, :1]).kind == "value_by_class"


def test_frames_land_where_the_axes_say(tmp_path):
    canvas = Canvas([str(d) for d in range(10)], (-10, 10), (-10, 10), ("z[0]", "z[1]"))
    xy = np.array([[0.0, 0.0], [5.0, -5.0], [50.0, 0.0]], np.float32)
    image = canvas.render(xy, np.array([3, 7, 1]), "step 1")
    rgb = np.asarray(image.convert("RGB"))
    for (x, y), colour in zip(xy[:2], (3, 7), strict=True):
        col, row = np.rint(np.array([x, y]) * canvas.ax_scale + canvas.ax_offset).astype(int)
        assert tuple(rgb[row, col]) == _tab10()[colour]
    assert image.mode == "P" and image.size == (640, 480)
    gif = GifWriter(tmp_path / "f.gif", image.size, canvas.palette, fps=10)
    for _ in range(3):
        gif.add(canvas.render(xy, np.array([3, 7, 1]), "again"))
    gif.close()
    assert gif_frames(tmp_path / "f.gif") == 3
    with Image.open(tmp_path / "f.gif") as g:
        assert g.info["duration"] == 100 and g.info.get("loop") == 0
        assert (np.asarray(g.convert("RGB"))[40:] == rgb[40:]).all()  # below the title: same


def _tab10():
    return [tuple(int(c) for c in row) for row in TAB10]
