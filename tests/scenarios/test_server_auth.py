"""A team server that lets no one else in: MLflow's basic-auth app on 127.0.0.1, set up by steps
1 and 2 of docs/cluster.md, one for the module. Credentials come from MLflow's own variables;
refused ones and a read-only user stop a run before any data is loaded; sixteen jobs write
through it at once and lose nothing; and a password reaches nothing a run writes. Suite time:
one server of one worker, three CLI runs that stop before any data, two that stop at once, one
tiny run that waits out a paused server, one sweep of sixteen tiny jobs."""

from __future__ import annotations

import os
import secrets
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import (
    TeamServer,
    env_for,
    free_port,
    metric_steps,
    run_cli,
    start_cli,
    sweep_of,
)
from vaeexp.tracking.store import TrackingUnavailable, check_reachable
from vaeexp.validate import ConfigError, check_no_credentials

# MNIST that is not there and may not be fetched: a run that got as far as its data would end
# with a data error, not the server's.
NO_DATA = ["data=mnist", "data.download=false", "data.fallback=null", "data.system_dirs=[]"]
TINY = ["data=mnist_bundled", "data.train_limit=200", "data.test_limit=100", "epochs=1"]
TINY += ["intermediate_dim=16", "film=off", "iwae.images=0", "log_every_n_steps=1"]
TINY += ["runtime.progress=false", "tracking.log_model=false", "tracking.log_images=false"]

pytestmark = pytest.mark.xdist_group("team-server")  # one worker, so one server for the module


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TeamServer]:
    server = TeamServer(tmp_path_factory.mktemp("team-server"))
    yield server
    server.stop()


def env(team: TeamServer, root: Path, user: str | None, password: str | None = None) -> dict:
    """A project folder under `root`, logging in to the team's server as `user`."""
    return {**env_for(root), "MLFLOW_TRACKING_URI": "", **team.login(user, password)}


def server(team: TeamServer) -> list[str]:
    return ["tracking=server", f"tracking.uri={team.uri}"]


def runs_in(team: TeamServer, monkeypatch: pytest.MonkeyPatch) -> list:
    client = team.admin(monkeypatch)
    return client.search_runs([client.get_experiment_by_name("vaeexp").experiment_id])


def only_line(stderr: str) -> str:
    [line] = [x for x in stderr.splitlines() if x.strip()]
    return line


def test_missing_or_refused_credentials_stop_before_any_data_is_loaded(
    team: TeamServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    before = {r.info.run_id for r in runs_in(team, monkeypatch)}
    said = f"vaeexp: error: tracking.uri={team.uri}: the server refused the credentials"
    none = run_cli(*server(team), *NO_DATA, env=env(team, tmp_path / "a", None))
    assert none.returncode == 1, none.stderr[-2000:]
    assert only_line(none.stderr) == (
        f"{said} (401); none were given: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
    )
    wrong = "not-" + team.passwords["alice"]
    sweep = run_cli(
        "-m", *server(team), *NO_DATA, "latent_dim=2,3",
        env=env(team, tmp_path / "b", "alice", wrong),
    )  # fmt: skip
    assert sweep.returncode == 1, sweep.stderr[-2000:]
    assert only_line(sweep.stderr) == (
        f"{said} of user 'alice' (401); check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
    )
    assert wrong not in sweep.stdout + sweep.stderr
    assert not (tmp_path / "b" / "runs" / "multirun").exists()  # no sweep folder, no parent
    assert {r.info.run_id for r in runs_in(team, monkeypatch)} == before
    assert not list(tmp_path.rglob("checkpoint.*"))


def test_a_user_who_may_only_read_is_told_before_any_run_is_created(
    team: TeamServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, own_http_settings: None
):
    before = {r.info.run_id for r in runs_in(team, monkeypatch)}
    result = run_cli(*server(team), *NO_DATA, env=env(team, tmp_path, "bob"))
    assert result.returncode == 1, result.stderr[-2000:]
    assert only_line(result.stderr) == (
        f"vaeexp: error: tracking.uri={team.uri}: user 'bob' may read but not write the "
        "experiment 'vaeexp' there (permission READ: its runs would be refused with 403); ask "
        "the server's admin for EDIT on it, or log to another with tracking.experiment=<name>"
    )
    assert {r.info.run_id for r in runs_in(team, monkeypatch)} == before  # no run half made
    # The same question, asked of each user directly: only bob is stopped, and only where he
    # may not write (an experiment of his own is his to create).
    for user, experiment, refused in [
        ("bob", "vaeexp", True),
        ("bob", "bobs-own", False),
        ("alice", "vaeexp", False),
        ("admin", "vaeexp", False),
    ]:
        for k, v in team.login(user).items():
            monkeypatch.setenv(k, v)
        if refused:
            with pytest.raises(TrackingUnavailable, match="may read but not write"):
                check_reachable(team.uri, experiment)
        else:
            check_reachable(team.uri, experiment)


def test_credentials_in_the_uri_are_refused_before_anything_is_written(tmp_path: Path):
    """Hydra would save such a URI with the run's config before vaeexp's code runs: refused
    in its callback, nothing is written at all. No server needed: nothing is sent."""
    secret = secrets.token_hex(8)
    uri = f"http://alice:{secret}@127.0.0.1:{free_port()}"
    said = "vaeexp: error: tracking.uri (or MLFLOW_TRACKING_URI) holds credentials for 127.0.0.1:"
    one = run_cli(f"tracking.uri={uri}", *NO_DATA, env=env_for(tmp_path))
    sweep = run_cli(
        "-m", "latent_dim=2,3", *NO_DATA, env={**env_for(tmp_path), "MLFLOW_TRACKING_URI": uri}
    )
    for result in (one, sweep):
        assert result.returncode == 2, result.stderr[-2000:]
        line = only_line(result.stderr)
        assert line.startswith(said) and line.endswith(
            "and set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
        ), line
        assert secret not in result.stdout + result.stderr
    assert not (tmp_path / "runs").exists()  # no run folder, no .hydra, no store
    with pytest.raises(ConfigError, match="PGPASSWORD"):  # a database's password, too
        check_no_credentials(f"postgresql://vaeexp:{secret}@127.0.0.1:5432/vaeexp")
    check_no_credentials("postgresql://vaeexp@127.0.0.1:5432/vaeexp")  # a user name alone is fine


def test_a_busy_server_is_waited_for_not_taken_for_one_that_is_down(
    team: TeamServer, tmp_path: Path
):
    """What sixteen jobs starting at once on a small machine do to a server, made certain: it
    answers, but late (here: paused for longer than a client that gives up in seconds would
    wait). A server that is down refuses at once, and that still fails in seconds
    (test_faults.py); a busy one is waited for, and the run finishes."""
    os.killpg(team.proc.pid, signal.SIGSTOP)
    try:
        proc = start_cli(
            *server(team), *TINY, "tracking.experiment=busy",  # the sweep below has vaeexp
            env=env(team, tmp_path, "alice"), log=tmp_path / "run.log",
        )  # fmt: skip
        time.sleep(20)  # past the moment it asks the server, and past a short timeout
        assert proc.poll() is None, (tmp_path / "run.log").read_text()[-2000:]  # still waiting
    finally:
        os.killpg(team.proc.pid, signal.SIGCONT)
    assert proc.wait(timeout=300) == 0, (tmp_path / "run.log").read_text()[-2000:]
    assert "vaeexp: run " in (tmp_path / "run.log").read_text()


def test_sixteen_jobs_at_once_through_the_team_server_lose_nothing(
    team: TeamServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Every job's check, run, metrics, checkpoint and end go through the authenticated server at
    once. The password reaches no file a run or the sweep writes, no param or tag, no output."""
    result = run_cli(
        "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=16", *server(team), *TINY,
        "seed=range(16)",
        env=env(team, tmp_path, "alice"),
        timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "database is locked" not in output and "undelivered" not in output
    client = team.admin(monkeypatch)
    parent, children = sweep_of(client)
    assert parent.info.status == "FINISHED" and len(children) == 16
    assert [r.info.status for r in children] == ["FINISHED"] * 16
    # Every metric point, counted: the same steps for every key in every run, each once. MLflow's
    # system metrics are sampled on a clock, not at steps: a slower job has more of them.
    keys = [[k for k in r.data.metrics if not k.startswith("system/")] for r in children]
    steps = [
        {k: metric_steps(client, r.info.run_id, k) for k in run_keys}
        for r, run_keys in zip(children, keys, strict=True)
    ]
    assert [s for s in steps if s != steps[0]] == [], steps[0]
    assert steps[0]["train/loss_step"] == steps[0]["train/kl_step"] == [1, 2]  # 200 images / 100
    assert steps[0]["test/loss"] == steps[0]["train/loss"] == steps[0]["test/neg_elbo"] == [1]
    password = team.passwords["alice"]
    assert password not in output
    for run in [parent, *children]:
        recorded = {**run.data.params, **run.data.tags}
        assert not [k for k, v in recorded.items() if password in v], run.info.run_name
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "checkpoint.json" for p in written)
    assert any(p.parent.name == ".hydra" for p in written)
    assert any(p.name == "report.html" for p in written)
    assert not [p for p in written if password.encode() in p.read_bytes()]
