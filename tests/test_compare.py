"""The comparison report (vaeexp/compare.py) of a real sweep with a diverged job, through the
launching process's callback and through `python -m vaeexp.compare`, opened in Chromium."""

from __future__ import annotations

import csv
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import TINY, env_for, run_cli

QUICK = [*TINY, "intermediate_dim=16", "batch_size=50", "tracking.log_model=false"]
QUICK += ["iwae.images=0", "epochs=2"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """latent_dim 2 and 3, each with a sane lr and one that diverges at once."""
    root = tmp_path_factory.mktemp("compare")
    env = env_for(root)
    result = run_cli("-m", "latent_dim=2,3", "lr=0.001,1e30", *QUICK, env=env)
    assert result.returncode == 0, result.stderr[-3000:]  # a diverged job does not stop a sweep
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("vaeexp").experiment_id])
    [parent] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return env, client, parent, Path(parent.data.tags["sweep"])


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_sweep_ends_with_its_report_on_the_parent(sweep):
    _env, client, parent, folder = sweep
    logged = {f.path for f in client.list_artifacts(parent.info.run_id, "report")}
    assert logged == {
        f"report/{name}"
        for name in (
            "runs.md",
            "runs.csv",
            "test_loss_vs_values.png",
            "learning_curves.png",
            "contact_sheet.png",
            "report.html",
            "summary.json",
        )
    }
    rows = read_csv(folder / "report" / "runs.csv")
    assert len(rows) == 4  # failed runs are listed, not dropped
    assert {(r["latent_dim"], r["lr"], r["status"]) for r in rows} == {
        ("2", "0.001", "FINISHED"),
        ("3", "0.001", "FINISHED"),
        ("2", "1e+30", "DIVERGED"),
        ("3", "1e+30", "DIVERGED"),
    }
    for r in rows:
        if r["status"] == "FINISHED":
            loss, recon, kl = (float(r[k]) for k in ("test loss", "test recon", "test KL"))
            assert loss == pytest.approx(recon + kl, abs=0.02) and r["epochs"] == "2"
            assert float(r["wall (s)"]) > 0
        else:
            assert r["test loss"] == ""
    md = (folder / "report" / "runs.md").read_text().splitlines()
    assert md[0].startswith("| run | status | latent_dim | lr | test loss |") and len(md) == 6


def test_compare_cli_by_sweep_parent_and_experiment(sweep, tmp_path):
    env, _client, parent, folder = sweep
    for args in (
        ["--sweep", str(folder)],
        ["--parent", parent.info.run_id],
        ["--experiment", "vaeexp"],
    ):
        out = tmp_path / args[0].strip("-")
        result = run_cli(*args, "--out", str(out), "--no-log", env=env, module="vaeexp.compare")
        assert result.returncode == 0, result.stderr[-2000:]
        assert len(read_csv(out / "runs.csv")) == 4  # the parent itself is never a row
    bad = run_cli("--sweep", str(tmp_path), env=env, module="vaeexp.compare")
    assert bad.returncode == 1 and "is this a sweep folder" in bad.stderr


def test_html_report_loads_every_image_and_film_in_chromium(sweep):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    _env, _client, _parent, folder = sweep
    page = folder / "report" / "report.html"
    text = page.read_text()
    # every run's film; the diverged runs' films end where they stopped
    assert text.count("data:image/gif;base64,") == 4
    assert "http://" not in text and "https://" not in text  # self-contained
    dom = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=10000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    loaded = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
    assert loaded, dom[:2000]
    ok, total = map(int, loaded.groups())
    assert ok == total == 4 + 3  # the films and the three plots
    assert dom.count("<tr data-run=") == 4
