"""Sweeps made up straight in an MLflow store, for the comparison report's tests and benchmark:
runs with vaeexp's params, tags, metric histories and film artifacts, but no training."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from PIL import Image, ImageDraw

from vaeexp.film.render import FILM_FOLDER, FINAL_FRAME

# Injected into a copy of report.html: once the page has loaded, click a table's column header
# (twice when "desc") and record the rows' order and the films' order.
SORT_CHECK = """<script>
window.addEventListener("load", () => setTimeout(() => {
  const [table, column, clicks] = %s;
  const th = [...document.querySelectorAll(`#${table} th`)].find(h => h.textContent === column);
  for (let i = 0; i < clicks; i++) th.click();
  const rows = [...document.querySelectorAll(`#${table} tbody tr`)];
  document.body.dataset.sorted = JSON.stringify({
    rows: rows.map(tr => tr.children[0].dataset.v),
    keys: rows.map(tr => tr.dataset.key),
    films: [...document.querySelectorAll("#films > figure")].map(f => f.dataset.key),
  });
}, 0));
</script>"""

DEFAULTS = {"latent_dim": "2", "intermediate_dim": "256", "lr": "0.001", "seed": "0"}
DEFAULTS |= {"epochs": "50", "data.name": "mnist", "data.binarize": "none"}
IWAE = "test_nll_iwae_k1000"


def frame_png(folder: Path, colour: int = 0, size: tuple[int, int] = (640, 480)) -> Path:
    """A small palette PNG named as vaeexp names the film's last frame."""
    folder.mkdir(parents=True, exist_ok=True)
    image = Image.new("P", size, 0)
    image.putpalette([255, 255, 255, 30 * colour % 256, 90, 200] + [0] * 762)
    ImageDraw.Draw(image).ellipse((size[0] // 3, size[1] // 3, size[0] // 2, size[1] // 2), 1)
    path = folder / FINAL_FRAME
    image.save(path)
    return path


def film_gif(path: Path, frames: int = 5, size: tuple[int, int] = (320, 240)) -> Path:
    """A small animated GIF standing in for a run's latent film."""
    images = [Image.new("P", size, 0) for _ in range(frames)]
    for i, image in enumerate(images):
        image.putpalette([255, 255, 255, 200, 40, 40] + [0] * 762)
        ImageDraw.Draw(image).rectangle((10 + 20 * i, 10, 40 + 20 * i, 40), 1)
    images[0].save(path, save_all=True, append_images=images[1:], duration=100, loop=0)
    return path


def parent_run(client: MlflowClient, experiment_id: str, overrides: str, folder: str) -> str:
    run = client.create_run(
        experiment_id,
        run_name=f"sweep {overrides}",
        tags={"sweep": folder, "hydra_overrides": overrides},
    )
    client.log_param(run.info.run_id, "sweep.overrides", overrides)
    return run.info.run_id


def add_run(
    client: MlflowClient,
    experiment_id: str,
    overrides: dict[str, str],
    *,
    parent: str | None = None,
    final: float | None = 500.0,
    epochs: int = 50,
    status: str = "FINISHED",
    frame: Path | None = None,
    film: Path | None = None,
    params: dict[str, str] | None = None,
    histories: tuple[str, ...] = (),
) -> str:
    """One child run: `final` is its last test loss (None: it diverged, so no final metrics);
    recon is 97% of the loss, KL the rest, the IWAE bound 5 nats lower.
    `params` adds params; `histories` adds per-epoch curves of other keys, as a real run has.
    """
    name = ",".join(f"{k}={v}" for k, v in overrides.items())
    tags = {"hydra_overrides": " ".join(f"{k}={v}" for k, v in overrides.items())}
    if parent:
        tags |= {"mlflow.parentRunId": parent, "sweep": "fake"}
    if status == "DIVERGED":
        tags["diverged"] = "true"
    run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    params = DEFAULTS | (params or {}) | overrides | {"epochs": str(epochs)}
    now = int(time.time() * 1000)
    metrics = []
    if final is not None:
        steps = np.arange(1, epochs + 1)
        curve = final + 200 * (np.exp(-steps / 8) - np.exp(-epochs / 8))  # ends at `final`
        for key in ("test/loss", *histories):
            metrics += [Metric(key, float(v), now, s) for s, v in enumerate(curve, 1)]
        last = {"test/recon": 0.97 * final, "test/kl": 0.03 * final, "test/neg_elbo": final + 1}
        last |= {IWAE: final - 5, "epoch": float(epochs)}
        metrics += [Metric(k, v, now, epochs) for k, v in last.items()]
    client.log_batch(
        run_id,
        metrics=metrics,
        params=[Param(k, v) for k, v in params.items()],
        tags=[RunTag("data.binarize", "none")],
    )
    if frame is not None:
        client.log_artifact(run_id, str(frame), FILM_FOLDER)
    if film is not None:
        client.log_artifact(run_id, str(film), FILM_FOLDER)
    client.set_terminated(run_id, "FAILED" if status == "DIVERGED" else status)
    return run_id


def fake_sweep(
    client: MlflowClient,
    experiment_id: str,
    settings: Iterable[dict[str, str]],
    seeds: Iterable[int],
    loss: dict[tuple[str, int], float | None],
    folder: Path,
    *,
    frame: Path | None = None,
    film: Path | None = None,
    **kwargs,
) -> tuple[str, dict[tuple[str, int], str]]:
    """A parent run and a child per setting and seed; loss[(setting's name, seed)] is its
    final test loss (None: diverged). Every run gets the same final frame and film (default:
    small ones made in `folder`). Returns (parent id, {(name, seed): run id})."""
    settings, seeds = list(settings), list(seeds)
    keys = " ".join(f"{k}={','.join(sorted({s[k] for s in settings}))}" for k in settings[0])
    parent = parent_run(client, experiment_id, f"{keys} seed={','.join(map(str, seeds))}", "fake")
    frame = frame or frame_png(folder / "frame")
    film = film or film_gif(folder / "latent.gif")
    ids = {}
    for setting in settings:
        name = ",".join(f"{k}={v}" for k, v in setting.items())
        for seed in seeds:
            final = loss[(name, seed)]
            ids[(name, seed)] = add_run(
                client,
                experiment_id,
                {**setting, "seed": str(seed)},
                parent=parent,
                final=final,
                status="FINISHED" if final is not None else "DIVERGED",
                frame=frame,
                film=film,
                **kwargs,
            )
    return parent, ids


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def dom(browser: str, url: str) -> str:
    """The page's DOM after it ran its scripts and loaded its images, in headless Chromium."""
    return subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
         "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout  # fmt: skip


def body_data(page_dom: str, name: str) -> str:
    """A data-* attribute of the page's <body> (what the page or a check script left there)."""
    found = re.search(rf'<body[^>]*\sdata-{name}="([^"]*)"', page_dom)
    assert found, page_dom[:2000]
    return html.unescape(found.group(1))


def sorted_by(browser: str, page: Path, table: str, column: str, clicks: int) -> dict:
    """The order of a table's rows and of the films after clicking `column` `clicks` times,
    from a copy of the page beside it (its relative links still resolve)."""
    check = page.with_name("sort-check.html")
    script = SORT_CHECK % json.dumps([table, column, clicks])
    check.write_text(page.read_text().replace("</body>", script + "</body>"))
    return json.loads(body_data(dom(browser, check.as_uri()), "sorted"))


def bulk_children(
    uri: str, experiment_id: str, parent: str, children: list[tuple[str, float | None]]
) -> list[str]:
    """Children of `parent` as (status, final test loss or None), the first started first,
    written in one transaction through MLflow's own store models: one API call at a time, a
    thousand runs take a minute on 2 cores. Returns their ids."""
    import uuid

    from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric, SqlRun, SqlTag
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    store = SqlAlchemyStore(uri, "unused")
    artifacts = store.get_experiment(experiment_id).artifact_location
    start = int(time.time() * 1000) - len(children) - 1000
    ids, rows = [], []
    for i, (status, loss) in enumerate(children):
        run_id = uuid.uuid4().hex
        run = SqlRun(
            run_uuid=run_id,
            name=f"child {i}",
            experiment_id=int(experiment_id),
            status=status,
            start_time=start + i,
            end_time=None if status == "RUNNING" else start + i + 1,
            lifecycle_stage="active",
            artifact_uri=f"{artifacts}/{run_id}/artifacts",
            source_type="LOCAL",
            source_name="",
            entry_point_name="",
            source_version="",
            user_id="vaeexp",
        )
        run.tags = [SqlTag(key="mlflow.parentRunId", value=parent),
                    SqlTag(key="mlflow.runName", value=f"child {i}")]  # fmt: skip
        rows.append(run)
        if loss is not None:
            point = {"key": "test/loss", "value": loss, "timestamp": start, "step": 1}
            rows += [SqlMetric(run_uuid=run_id, **point), SqlLatestMetric(run_uuid=run_id, **point)]
        ids.append(run_id)
    with store.ManagedSessionMaker(read_only=False) as session:
        session.add_all(rows)
    return ids
