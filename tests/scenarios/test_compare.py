"""The comparison report (vaeexp/compare/) of a real seed-replicated sweep with diverging jobs,
through the launching process's callback and through `python -m vaeexp.compare`, opened in
Chromium. tests/vaeexp/compare/test_groups.py checks the grouping on made-up sweeps."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.compare_support import body_data, chromium, dom, sorted_by
from tests.conftest import TINY, env_for, run_cli
from vaeexp.compare.parent import GROUP_TAG

QUICK = [*TINY, "intermediate_dim=16", "batch_size=50", "tracking.log_model=false"]
QUICK += ["iwae.images=0", "epochs=2"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """latent_dim 2 and 3, each with a sane lr and one that diverges at once, two seeds each."""
    root = tmp_path_factory.mktemp("compare")
    env = env_for(root)
    result = run_cli("-m", "latent_dim=2,3", "lr=0.001,1e30", "seed=0,1", *QUICK, env=env)
    assert result.returncode == 0, result.stderr[-3000:]  # a diverged job does not stop a sweep
    (root / "stdout.txt").write_text(result.stdout)
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("vaeexp").experiment_id])
    [parent] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return env, client, parent, Path(parent.data.tags["sweep"])


def test_the_sweep_names_its_best_setting_not_its_luckiest_run(sweep):
    env, client, parent, folder = sweep
    groups = json.loads((folder / "report" / "summary.json").read_text())["groups"]
    means = {k: g["test/loss"]["mean"] for k, g in groups.items() if "test/loss" in g}
    assert sorted(means) == ["latent_dim=2 lr=0.001", "latent_dim=3 lr=0.001"]  # not diverged
    best = min(means, key=means.get)
    assert client.get_run(parent.info.run_id).data.tags["best_group"] == best
    said = (Path(env["VAEEXP_RUNS"]).parent / "stdout.txt").read_text()
    assert f"best setting {best}: test loss {means[best]:.2f} ± " in said


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
            "groups.md",
            "groups.csv",
            "test_loss_vs_values.png",
            "learning_curves.png",
            "contact_sheet.png",
            "report.html",
            "summary.json",
        )
    }
    rows = read_csv(folder / "report" / "runs.csv")
    assert len(rows) == 8  # failed runs are listed, not dropped
    assert {(r["latent_dim"], r["lr"], r["seed"], r["status"]) for r in rows} == {
        (d, lr, seed, "FINISHED" if lr == "0.001" else "DIVERGED")
        for d in ("2", "3")
        for lr in ("0.001", "1e+30")
        for seed in ("0", "1")
    }
    for r in rows:
        if r["status"] == "FINISHED":
            loss, recon, kl = (float(r[k]) for k in ("test loss", "test recon", "test KL"))
            assert loss == pytest.approx(recon + kl, abs=0.02) and r["epochs"] == "2"
            assert (
                float(r["wall (s)"]) > 0 and r["group"] == f"latent_dim={r['latent_dim']} lr=0.001"
            )
        else:
            assert r["test loss"] == ""
    md = (folder / "report" / "runs.md").read_text().splitlines()
    assert (
        md[0].startswith("| run | status | latent_dim | lr | seed | test loss |") and len(md) == 10
    )
    # the groups: seeds averaged, diverged runs counted apart, never averaged in
    groups = {g["group"]: g for g in read_csv(folder / "report" / "groups.csv")}
    assert set(groups) == {f"latent_dim={d} lr={lr}" for d in (2, 3) for lr in ("0.001", "1e+30")}
    metrics = client.get_run(parent.info.run_id).data.metrics
    for d in ("2", "3"):
        losses = [  # full precision: runs.csv rounds to 2 decimals
            client.get_run(r["run_id"]).data.metrics["test/loss"]
            for r in rows
            if r["latent_dim"] == d and r["lr"] == "0.001"
        ]
        group = groups[f"latent_dim={d} lr=0.001"]
        assert (group["n"], group["finished"], group["left out"]) == ("2", "2", "")
        assert float(group["test loss mean"]) == pytest.approx(statistics.mean(losses), abs=1e-3)
        assert float(group["test loss std"]) == pytest.approx(statistics.stdev(losses), abs=1e-3)
        assert metrics[f"group/latent_dim-{d}/lr-0.001/test_loss_mean"] == pytest.approx(
            statistics.mean(losses)
        )
        diverged = groups[f"latent_dim={d} lr=1e+30"]
        assert (diverged["finished"], diverged["left out"], diverged["test loss mean"]) == (
            "0",
            "2 diverged",
            "",
        )
        assert metrics[f"group/latent_dim-{d}/lr-1e_30/n_runs"] == 2
    for r in rows:
        assert client.get_run(r["run_id"]).data.tags[GROUP_TAG] == r["group"]


def test_compare_cli_by_sweep_parent_and_experiment(sweep, tmp_path):
    env, _client, parent, folder = sweep
    for args, runs, groups in (
        (["--sweep", str(folder)], 8, 4),
        (["--parent", parent.info.run_id, "--no-group"], 8, None),
        (["--experiment", "vaeexp", "--group-by", "latent_dim"], 8, 2),
        (["--filter", "params.lr = '1e+30'"], 4, 2),
    ):
        out = tmp_path / args[0].strip("-")
        result = run_cli(*args, "--out", str(out), "--no-log", env=env, module="vaeexp.compare")
        assert result.returncode == 0, result.stderr[-2000:]
        assert len(read_csv(out / "runs.csv")) == runs  # the parent itself is never a row
        if groups is None:
            assert not (out / "groups.csv").exists()
        else:
            assert len(read_csv(out / "groups.csv")) == groups
    by_dim = {g["group"]: g for g in read_csv(tmp_path / "experiment" / "groups.csv")}
    assert by_dim["latent_dim=2"]["left out"] == "2 diverged"  # of 4: never averaged in
    assert by_dim["latent_dim=2"]["finished"] == "2"
    bad = run_cli("--sweep", str(tmp_path), env=env, module="vaeexp.compare")
    assert bad.returncode == 1 and "is this a sweep folder" in bad.stderr


def test_html_report_loads_every_image_and_film_in_chromium(sweep):
    browser = chromium()
    if browser is None:
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    _env, _client, _parent, folder = sweep
    page = folder / "report" / "report.html"
    text = page.read_text()
    # every run's film; the diverged runs' films end where they stopped
    assert text.count('data-film="data:image/gif;base64,') == 8
    assert "http://" not in text and "https://" not in text  # self-contained
    assert text.count('<tr data-key="') == 4 + 8  # the groups; every run under "All runs"
    loaded = body_data(dom(browser, page.as_uri() + "#all"), "images-loaded")
    assert loaded == f"{8 + 3}/{8 + 3}"  # the films and the three plots
    groups = read_csv(folder / "report" / "groups.csv")
    means = {g["group"]: float(g["test loss mean"]) for g in groups if g["test loss mean"]}
    order = sorted_by(browser, page, "groups", "test loss", 2)  # descending
    assert order["rows"][:2] == sorted(means, key=means.get, reverse=True)
    assert len(order["rows"]) == 4  # the groups without a mean stay, at the end
    assert order["films"] == order["keys"]  # the films follow the table
