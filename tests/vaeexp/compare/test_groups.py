"""The comparison report's groups (vaeexp/compare/groups.py, parent.py) on sweeps made up in a
real MLflow store: known losses, so every mean, spread and median is known."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import validate_param_and_metric_name

from tests.compare_support import (
    IWAE,
    add_run,
    body_data,
    chromium,
    dom,
    fake_sweep,
    frame_png,
    sorted_by,
)
from vaeexp.compare import report
from vaeexp.compare.__main__ import main
from vaeexp.compare.groups import band, grouping, make_groups, statistics
from vaeexp.compare.parent import GROUP_TAG, KEYS_TAG, metric_names
from vaeexp.compare.runs import Row

# latent_dim=2: 510, 500, 502 -> mean 504, sample std sqrt(28), median run seed 2.
# latent_dim=8: 480, diverged, 484 -> mean 482 over 2 of 3, std sqrt(8), median seed 0.
LOSS = {("latent_dim=2", 0): 510.0, ("latent_dim=2", 1): 500.0, ("latent_dim=2", 2): 502.0}
LOSS |= {("latent_dim=8", 0): 480.0, ("latent_dim=8", 1): None, ("latent_dim=8", 2): 484.0}
SETTINGS = [{"latent_dim": "2"}, {"latent_dim": "8"}]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def store(tmp_path_factory, empty_db):
    """(client, experiment id, parent id, {(setting, seed): run id}, folder) of one made-up
    sweep of 2 settings x 3 seeds, one diverged."""
    root = tmp_path_factory.mktemp("groups")
    shutil.copy(empty_db, root / "mlflow.db")
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.create_experiment("vaeexp", str(root / "mlartifacts"))
    parent, ids = fake_sweep(client, experiment, SETTINGS, range(3), LOSS, root / "files")
    return client, experiment, parent, ids, root


def row(loss: float | None, name: str = "r", status: str = "FINISHED", **values: str) -> Row:
    metrics = {} if loss is None else {"test/loss": loss, "test/kl": loss / 100}
    return Row(name, name, status, values, metrics, 10, 1.0, curve=[])


def test_statistics_median_and_left_out_runs_on_known_numbers():
    assert statistics([510, 500, 502]) == pytest.approx(
        {"n": 3, "mean": 504, "std": math.sqrt(28), "min": 500, "max": 510}
    )
    assert "std" not in statistics([7.0])  # one run has no spread
    rows = [
        row(510, "a", latent_dim="2", seed="0"),
        row(500, "b", latent_dim="2", seed="1"),
        row(502, "c", latent_dim="2", seed="2"),
        row(480, "d", latent_dim="8", seed="0"),
        row(None, "e", "DIVERGED", latent_dim="8", seed="1"),
        row(484, "f", latent_dim="8", seed="2"),
        row(None, "g", "FAILED", latent_dim="8", seed="3"),
    ]
    eight, two = make_groups(rows, ["latent_dim"])  # sorted by mean test loss
    assert (eight.label, two.label) == ("latent_dim=8", "latent_dim=2")
    assert two.representative.name == "c" and [r.name for r in two.members] == ["b", "c", "a"]
    assert eight.stat("test/loss", "mean") == 482 and eight.stat("test/loss", "n") == 2
    assert eight.stat("test/loss", "std") == pytest.approx(math.sqrt(8))
    assert eight.stat("test/kl", "mean") == pytest.approx(4.82)
    assert eight.representative.name == "d"  # the lower median of two
    assert eight.problems() == "1 diverged, 1 failed" and two.problems() == ""
    assert len(make_groups(rows, None)) == 7  # --no-group: each run on its own
    [everything] = make_groups(rows, [])
    assert everything.label == "all runs" and len(everything.finished) == 5


def test_band_is_mean_and_spread_epoch_by_epoch():
    a, b, c = row(10, "a", k="1"), row(14, "b", k="1"), row(None, "c", "DIVERGED", k="1")
    a.curve, b.curve, c.curve = [(1, 20.0), (2, 10.0)], [(1, 24.0), (2, 14.0)], [(1, 99.0)]
    [group] = make_groups([a, b, c], ["k"])
    steps, mean, low, high = band(group, "std")
    assert steps.tolist() == [1, 2] and mean.tolist() == [22, 12]  # the diverged run left out
    assert high - mean == pytest.approx([math.sqrt(8)] * 2) and mean - low == pytest.approx(
        high - mean
    )
    assert band(group, "minmax")[2].tolist() == [20, 10]


def test_grouping_rules():
    assert grouping(["latent_dim", "seed", "lr"], group_by=None, group=True) == ["latent_dim", "lr"]
    assert grouping(["latent_dim", "lr"], group_by=None, group=True) is None  # no seeds
    assert grouping(["latent_dim", "seed"], group_by=["lr"], group=True) == ["lr"]
    assert grouping(["latent_dim", "seed"], group_by=None, group=False) is None
    assert grouping(["seed"], group_by=None, group=True) == []  # one group of every run


def test_metric_names_are_valid_mlflow_names_and_distinct():
    rows = [
        row(1, "a", lr="1e+30", data="a/b"),
        row(2, "b", lr="1e 30", data="a/b"),  # the same name once sanitised
        row(3, "c", lr="..", data=""),
        row(4, "d", lr="x" * 300, data="y"),
    ]
    groups = make_groups(rows, ["lr", "data"])
    names = metric_names(groups, IWAE)
    assert names["lr=1e+30 data=a/b"]["test/loss.mean"] == "group/lr-1e_30/data-a_b/test_loss_mean"
    all_names = [n for g in names.values() for n in g.values()]
    assert len(set(all_names)) == len(all_names)
    for name in all_names:
        assert validate_param_and_metric_name(name) and len(name) <= 250, name
        assert "//" not in name and "/../" not in name and "/./" not in name


def test_report_groups_over_seeds_and_logs_to_the_parent(store, tmp_path):
    client, _experiment, parent, ids, _root = store
    out = tmp_path / "report"
    files = report(client, out, parent=parent)
    assert {p.name for p in files} >= {"groups.csv", "groups.md", "runs.csv", "report.html"}
    groups = read_csv(out / "groups.csv")
    assert [g["group"] for g in groups] == ["latent_dim=8", "latent_dim=2"]
    eight, two = groups
    assert (eight["n"], eight["finished"], eight["left out"]) == ("3", "2", "1 diverged")
    assert float(eight["test loss mean"]) == 482 and float(two["test loss mean"]) == 504
    assert float(two["test loss std"]) == pytest.approx(math.sqrt(28), abs=1e-4)
    assert (float(two["test loss min"]), float(two["test loss max"])) == (500, 510)
    assert float(two["IWAE bound mean"]) == 499  # 5 nats under the loss, as made up
    assert float(two["test neg ELBO mean"]) == 505
    assert two["representative run_id"] == ids[("latent_dim=2", 2)]
    assert eight["representative run_id"] == ids[("latent_dim=8", 0)]
    runs = read_csv(out / "runs.csv")
    assert len(runs) == 6 and {r["group"] for r in runs} == {"latent_dim=2", "latent_dim=8"}
    # in MLflow: the parent's group metrics, each child's group tag
    top = client.get_run(parent).data
    assert top.metrics["group/latent_dim-2/test_loss_mean"] == pytest.approx(504)
    assert top.metrics["group/latent_dim-2/test_loss_std"] == pytest.approx(math.sqrt(28))
    assert top.metrics[f"group/latent_dim-8/{IWAE}_min"] == pytest.approx(475)
    assert top.metrics["group/latent_dim-8/n_runs"] == 3
    assert top.metrics["group/latent_dim-8/n_finished"] == 2
    assert top.tags[KEYS_TAG] == "latent_dim"
    for (setting, _seed), run_id in ids.items():
        assert client.get_run(run_id).data.tags[GROUP_TAG] == setting
    logged = {f.path for f in client.list_artifacts(parent, "report")}
    assert {"report/groups.csv", "report/report.html"} <= logged
    summary = json.loads((out / "summary.json").read_text())
    assert summary["grouped_by"] == ["latent_dim"]
    assert summary["groups"]["latent_dim=2"]["test/loss"]["mean"] == 504
    page = (out / "report.html").read_text()
    assert page.count('<tr data-key="') == 2 + 6  # the groups, and every run under "All runs"
    assert "504.00 ± 5.29" in page and "1 diverged" in page


def test_cli_group_by_no_group_and_what_is_logged(store, tmp_path, capsys):
    client, _experiment, parent, _ids, _root = store
    uri = client.tracking_uri
    main(["--uri", uri, "--parent", parent, "--no-group", "--out", str(tmp_path / "a")])
    assert "logged to parent run" in capsys.readouterr().out
    assert not (tmp_path / "a" / "groups.csv").exists()
    assert len(read_csv(tmp_path / "a" / "runs.csv")) == 6
    main(
        [
            "--uri",
            uri,
            "--parent",
            parent,
            "--group-by",
            "seed",
            "--no-log",
            "--out",
            str(tmp_path / "b"),
        ]
    )
    assert "nothing logged to MLflow (--no-log)" in capsys.readouterr().out
    by_seed = {g["group"]: g for g in read_csv(tmp_path / "b" / "groups.csv")}
    assert by_seed["seed=1"]["left out"] == "1 diverged"
    assert float(by_seed["seed=0"]["test loss mean"]) == 495  # (510 + 480) / 2
    with pytest.raises(SystemExit):
        main(["--uri", uri, "--parent", parent, "--band", "wide"])
    with pytest.raises(SystemExit) as unknown:
        main(["--uri", uri, "--parent", parent, "--group-by", "latnt_dim"])
    assert "--group-by latnt_dim: no run has such a setting" in str(unknown.value)
    with pytest.raises(SystemExit) as unquoted:
        main(["--uri", uri, "--parent", parent, "--filter", "params.latent_dim=8"])
    assert "--filter 'params.latent_dim=8': Expected a quoted string" in str(unquoted.value)


def test_filter_compares_runs_from_several_sweeps(store, tmp_path, capsys):
    client, experiment, parent, _ids, root = store
    later = {("latent_dim=8", 0): 470.0, ("latent_dim=16", 0): 460.0}
    settings = [{"latent_dim": "8"}, {"latent_dim": "16"}]
    other, _ = fake_sweep(client, experiment, settings, [0], later, root / "later")
    out = tmp_path / "filtered"
    main(["--uri", client.tracking_uri, "--filter", "params.latent_dim = '8'", "--out", str(out)])
    assert "nothing logged to MLflow (no parent run" in capsys.readouterr().out
    runs = read_csv(out / "runs.csv")
    assert len(runs) == 4  # 3 + 1, from two sweeps
    assert {client.get_run(r["run_id"]).data.params["latent_dim"] for r in runs} == {"8"}
    [group] = read_csv(out / "groups.csv")
    assert float(group["test loss mean"]) == pytest.approx((480 + 484 + 470) / 3)
    assert "params.latent_dim = &#39;8&#39;" in (out / "report.html").read_text()  # escaped
    assert not any(k.startswith("group/") for k in client.get_run(other).data.metrics)
    # before and after: grouped by a tag, here the sweep each run belongs to
    by_sweep = tmp_path / "by-sweep"
    where = ["--filter", "params.latent_dim = '8'", "--group-by", "tags.mlflow.parentRunId"]
    main(["--uri", client.tracking_uri, *where, "--out", str(by_sweep)])
    means = {g["group"]: g["test loss mean"] for g in read_csv(by_sweep / "groups.csv")}
    assert means == {
        f"tags.mlflow.parentRunId={parent}": "482.0000",
        f"tags.mlflow.parentRunId={other}": "470.0000",
    }
    with pytest.raises(SystemExit) as bad:
        main(["--uri", client.tracking_uri, "--filter", "params.latent_dim = '999'"])
    assert "no runs to compare" in str(bad.value)


def test_runs_with_only_a_final_frame_and_runs_without_a_film(tmp_path, mlflow_store):
    client, _uri = mlflow_store
    experiment = client.create_experiment("vaeexp", str(tmp_path / "mlartifacts"))
    parent = client.create_run(experiment).info.run_id
    frame = frame_png(tmp_path / "f")
    framed = add_run(client, experiment, {"seed": "0"}, parent=parent, frame=frame)  # no GIF
    add_run(client, experiment, {"seed": "1"}, parent=parent, final=501)  # no film at all
    out = tmp_path / "report"
    report(client, out, parent=parent, log_to_parent=False)
    page = (out / "report.html").read_text()
    assert page.count('data-frame="data:image/png;base64,') == 1 and "no film" in page
    assert [g["group"] for g in read_csv(out / "groups.csv")] == ["all runs"]
    assert json.loads((out / "summary.json").read_text())["runs"][framed]["status"] == "FINISHED"


def test_films_past_the_budget_go_beside_the_page(store, tmp_path):
    client, _experiment, parent, _ids, _root = store
    out = tmp_path / "report"
    files = report(client, out, parent=parent, film_budget_mb=0.0, log_to_parent=False)
    beside = sorted((out / "films").iterdir())
    assert len(beside) == 6 and all(p in files for p in beside)
    page = (out / "report.html").read_text()
    assert "data:image/gif" not in page and page.count('data-film="films/') == 6
    assert "past the 0 MB embedding budget" in page


@pytest.mark.slow  # Chromium, several times
def test_page_loads_films_when_shown_and_sorts_groups_in_chromium(tmp_path, mlflow_store):
    browser = chromium()
    if browser is None:
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    client, _uri = mlflow_store
    experiment = client.create_experiment("vaeexp", str(tmp_path / "mlartifacts"))
    settings = [{"latent_dim": str(d)} for d in range(1, 13)]
    loss = {(f"latent_dim={d}", s): 500.0 - d + s for d in range(1, 13) for s in range(3)}
    loss[("latent_dim=5", 1)] = None
    parent, _ = fake_sweep(client, experiment, settings, range(3), loss, tmp_path / "files")
    out = tmp_path / "report"
    report(client, out, parent=parent, film_budget_mb=0.004)  # some embedded, some beside
    page = out / "report.html"
    shown, total = map(int, body_data(dom(browser, page.as_uri()), "films-shown").split("/"))
    assert total == 36 and shown < 12  # films load when shown: others are folded away
    every = body_data(dom(browser, page.as_uri() + "#all"), "images-loaded")
    assert every == f"{36 + 3}/{36 + 3}"  # every film (embedded or beside) and the 3 plots
    ascending = [f"latent_dim={d}" for d in range(12, 0, -1)]
    up = sorted_by(browser, page, "groups", "test loss", 1)
    assert up["rows"] == ascending and up["films"] == up["keys"]
    down = sorted_by(browser, page, "groups", "test loss", 2)
    assert down["rows"] == ascending[::-1] and down["films"] == down["keys"]
    by_name = sorted_by(browser, page, "groups", "latent_dim", 1)
    assert by_name["rows"] == [f"latent_dim={d}" for d in range(1, 13)]  # numbers, not text
