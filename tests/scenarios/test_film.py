"""The latent film (vaeexp/film/) in whole runs through `python -m vaeexp` and its re-render
through `python -m vaeexp.film`, read back from a real MLflow store. Its parts, in-process:
tests/vaeexp/film/."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import TINY, env_for, only_run, run_cli
from vaeexp.film.frames import Frames
from vaeexp.film.recorder import FRAMES_METRIC, TIMING_METRICS
from vaeexp.film.render import FINAL_FRAME, FINAL_FRAME_ARTIFACT

# 400 images / 50 = 8 steps an epoch
QUICK = [*TINY, "intermediate_dim=64", "batch_size=50", "tracking.log_model=false"]
QUICK += ["iwae.images=0"]


def image_steps(client, run_id: str, key: str) -> list[int]:
    """The steps of a key's images in MLflow's image slider (its files under images/)."""
    files = [f.path for f in client.list_artifacts(run_id, "images")]
    pattern = re.compile(rf"images/{key}\+step\+(\d+)\+timestamp\+\d+\+[\w-]+\.png$")
    return sorted(int(m.group(1)) for f in files if (m := pattern.match(f)))


def gif_frames(path: Path) -> int:
    with Image.open(path) as gif:
        return gif.n_frames


@pytest.fixture(scope="module")
def filmed(tmp_path_factory):
    """A default run (film on) and the same run with film=off, in one store."""
    root = tmp_path_factory.mktemp("film")
    env = env_for(root)
    on = run_cli(*QUICK, "epochs=3", "film.every_n_steps=3", env=env)
    assert on.returncode == 0, on.stderr[-3000:]
    client, _, run = only_run(env)
    off = run_cli(*QUICK, "epochs=3", "film=off", "tracking.experiment=off", env=env)
    assert off.returncode == 0, off.stderr[-3000:]
    off_run = client.search_runs([client.get_experiment_by_name("off").experiment_id])[0]
    return env, client, run, off_run


def test_schedule_frames_reach_mlflow(filmed):
    _env, client, run, _ = filmed
    # every step to 10, then every 3 steps to the end of epoch 1 (8 steps: none left), then
    # each epoch's end: 0..10, 16, 24
    expected = [*range(11), 16, 24]
    assert image_steps(client, run.info.run_id, "latent") == expected
    for key in ("film/knn_accuracy", "film/active_units"):
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in history) == expected
    knn = client.get_metric_history(run.info.run_id, "film/knn_accuracy")
    assert all(0 <= m.value <= 1 for m in knn)  # its value: film/test_frames.py
    units = client.get_metric_history(run.info.run_id, "film/active_units")
    assert all(0 <= m.value <= 2 for m in units)


def test_film_logs_where_its_time_went(filmed):
    """bench/film.py reads these metrics: logged once, at the last frame's step."""
    _env, client, run, off_run = filmed
    metrics = client.get_run(run.info.run_id).data.metrics
    assert metrics[FRAMES_METRIC] == 13
    for key in (FRAMES_METRIC, *TIMING_METRICS.values()):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [24], key
        assert metrics[key] >= 0
    assert (
        not set(TIMING_METRICS.values()) & client.get_run(off_run.info.run_id).data.metrics.keys()
    )


def test_film_artifacts_gif_decoder_and_frames(filmed, tmp_path):
    _env, client, run, _ = filmed
    names = {f.path for f in client.list_artifacts(run.info.run_id, "film")}
    assert names == {
        "film/latent.gif",
        "film/decoder.gif",
        "film/frames.npz",
        FINAL_FRAME_ARTIFACT,  # the last frame, under a name vaeexp owns (read by compare)
    }
    local = Path(client.download_artifacts(run.info.run_id, "film", str(tmp_path)))
    assert gif_frames(local / "latent.gif") == 13
    with Image.open(local / "latent.gif") as gif, Image.open(local / FINAL_FRAME) as final:
        gif.seek(gif.n_frames - 1)
        assert final.size == gif.size
        assert np.array_equal(np.asarray(final.convert("RGB")), np.asarray(gif.convert("RGB")))
    assert gif_frames(local / "decoder.gif") == 4  # before training, then each of 3 epochs
    frames = Frames.load(local / "frames.npz")
    assert frames.steps.tolist() == [*range(11), 16, 24]
    assert frames.means.shape == (13, 100, 2) and frames.labels.shape == (100,)
    assert np.isnan(frames.losses[0]).all() and np.isfinite(frames.losses[1:]).all()
    assert frames.epochs.tolist() == [0, *[1] * 8, 2, 2, 2, 3]
    assert frames.meta["class_names"] == [str(d) for d in range(10)]


def test_film_does_not_change_training(filmed):
    _env, client, run, off_run = filmed
    for key in ("train/loss_step", "test/loss", "test/kl"):
        on = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
        off = [(m.step, m.value) for m in client.get_metric_history(off_run.info.run_id, key)]
        assert on == off and on, key
    assert not image_steps(client, off_run.info.run_id, "latent")
    assert not client.list_artifacts(off_run.info.run_id, "film")


def test_pca_film_for_latent_dim_8_and_rerender(tmp_path):
    env = env_for(tmp_path)
    result = run_cli(
        *QUICK, "epochs=2", "latent_dim=8", "film.limits=auto", "film.mp4=true", env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    client, _, run = only_run(env)
    steps = [*range(11), 16]
    assert image_steps(client, run.info.run_id, "latent") == steps
    names = {f.path for f in client.list_artifacts(run.info.run_id, "film")}
    # no decoder film for latent_dim=8
    assert names == {"film/latent.gif", "film/latent.mp4", "film/frames.npz", FINAL_FRAME_ARTIFACT}
    local = Path(client.download_artifacts(run.info.run_id, "film", str(tmp_path / "a")))
    assert Frames.load(local / "frames.npz").means.shape == (12, 100, 8)
    assert gif_frames(local / "latent.gif") == 12
    import imageio.v2 as imageio

    with imageio.get_reader(local / "latent.mp4") as mp4:
        assert mp4.count_frames() == 12
    # re-render, logged next to the original, and written to a file
    again = run_cli(run.info.run_id, "--stride", "5", "--fps", "4", env=env, module="vaeexp.film")
    assert again.returncode == 0, again.stderr[-2000:]
    logged = "film/latent_fps4_stride5_limits-auto.gif"
    assert logged in {f.path for f in client.list_artifacts(run.info.run_id, "film")}
    path = Path(client.download_artifacts(run.info.run_id, logged, str(tmp_path / "b")))
    assert gif_frames(path) == 4  # frames 0, 5, 10 and the last
    with Image.open(path) as gif:
        assert gif.info["duration"] == 250
    out = tmp_path / "film.gif"
    written = run_cli(
        run.info.run_id, "--limits", "3", "--out", str(out), env=env, module="vaeexp.film"
    )
    assert written.returncode == 0 and gif_frames(out) == 12
    missing = run_cli("0" * 32, env=env, module="vaeexp.film")
    assert missing.returncode != 0 and "no run" in missing.stderr


def test_reference_cadence_films_every_step(tmp_path):
    env = env_for(tmp_path)
    result = run_cli(*QUICK, "epochs=2", "film=reference", "film.points=50", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    client, _, run = only_run(env)
    assert image_steps(client, run.info.run_id, "latent") == list(range(17))
    local = Path(client.download_artifacts(run.info.run_id, "film/frames.npz", str(tmp_path)))
    assert Frames.load(local).means.shape == (17, 50, 2)


def test_bad_film_settings_are_refused(tmp_path):
    env = env_for(tmp_path)
    for override, words in (
        ("film.limits=wide", "film.limits=wide is not allowed"),
        ("film.fps=0", "film.fps=0 is not allowed"),
        ("film=slow", "film=slow is not a known choice"),
    ):
        result = run_cli(*QUICK, override, env=env)
        assert result.returncode == 2 and words in result.stderr, result.stderr[-500:]
