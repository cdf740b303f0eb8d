"""vaeexp.slurm on a real SLURM cluster, logging to a real `mlflow server` on PostgreSQL with
MLflow's basic auth (docs/cluster.md): `tests/cluster/setup.sh` brings both up on
this machine (CI runs it; these tests skip, saying why, where it has not run). Covers a sweep
landing whole in MLflow with its user's credentials and nowhere else, a job requeued by SLURM
and one signalled before its time limit, a request no node can hold, and Ctrl-C followed by
`resume=auto`."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import (
    TeamServer,
    env_for,
    metric_steps,
    run_cli,
    start_cli,
    sweep_of,
    wait_for,
)
from vaeexp.tracking.store import TrackingUnavailable, check_reachable

SETUP = "run `sudo bash tests/cluster/setup.sh` first (CI does)"
DATABASE = "postgresql://vaeexp:vaeexp@127.0.0.1:5432/vaeexp"


def _missing() -> str | None:
    if shutil.which("sinfo") is None:
        return f"no SLURM on this machine: {SETUP}"
    answer = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    if answer.returncode or not answer.stdout.strip():
        return f"SLURM does not answer (sinfo: {answer.stderr.strip()[:100]}): {SETUP}"
    return None


pytestmark = [
    pytest.mark.skipif(_missing() is not None, reason=str(_missing())),
    pytest.mark.xdist_group("slurm"),  # one after another: they share the node and its queue
]

# Long enough to be signalled mid-training (15 steps an epoch), quick to start.
TRAIN = [
    "data=mnist_bundled",
    "data.train_limit=1500",
    "data.test_limit=100",
    "epochs=12",
    "runtime.progress=false",
    "tracking.log_model=false",
    "iwae.images=0",
]
SLURM = ["-m", "hydra/launcher=slurm", "hydra.launcher.timeout_min=15"]
QUICK = ["epochs=1", "data=mnist_bundled", "data.train_limit=200", "data.test_limit=100"]
QUICK += ["runtime.progress=false", "iwae.images=0", "film=off"]


@pytest.fixture(scope="module")
def postgres() -> Iterator[tuple[str, str]]:
    """Two fresh PostgreSQL databases of this module's own, for the runs and for the users, as
    URIs."""
    psycopg = pytest.importorskip("psycopg", reason='the server extra: pip install -e ".[dev]"')
    pytest.importorskip("flask_wtf", reason='the server extra: pip install -e ".[dev]"')
    names = [f"vaeexp_test_{uuid.uuid4().hex[:8]}{kind}" for kind in ("", "_auth")]
    try:
        admin = psycopg.connect(DATABASE, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as e:
        pytest.skip(f"no PostgreSQL for MLflow ({str(e).strip()[:100]}): {SETUP}")
    for name in names:
        admin.execute(f"CREATE DATABASE {name}")
    runs, users = (DATABASE.rsplit("/", 1)[0] + f"/{name}" for name in names)
    yield runs, users
    for name in names:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    admin.close()


@pytest.fixture(scope="module")
def server(
    postgres: tuple[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TeamServer]:
    """The team server of docs/cluster.md on 127.0.0.1 over those databases, serving artifacts
    itself."""
    runs, users = postgres
    team = TeamServer(tmp_path_factory.mktemp("server"), backend=runs, users=users)
    yield team
    team.stop()


def launch(*args: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    """`python -m vaeexp -m hydra/launcher=slurm ...`, in the background."""
    return start_cli(*SLURM, *args, env=env, log=log)


def sweep_folder(runs: Path) -> Path:
    return wait_for(
        "the sweep folder", lambda: next(runs.glob("multirun/*/*/.submitit"), None)
    ).parent


def job_id(folder: Path, num: int) -> str:
    """The SLURM id (array_task) of the sweep's job `num`, from submitit's folder names."""
    found = wait_for(f"job {num} submitted", lambda: list((folder / ".submitit").glob(f"*_{num}")))
    return found[0].name


def squeue(*args: str) -> str:
    return subprocess.run(["squeue", "-h", *args], capture_output=True, text=True).stdout


def release(job: str) -> None:
    """A requeued job waits about two minutes (SLURM's BeginTime) before it may start again:
    let it start now, or the test would mostly wait."""
    wait_for(f"{job} requeued", lambda: "BeginTime" in squeue("-j", job, "-o", "%r"), 120)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)


def assert_whole(client: MlflowClient, run, like) -> None:
    """`run` has exactly the metric points of `like`, an uninterrupted run of the same length."""
    for key in ("train/loss_step", "train/loss", "test/loss", "test/kl"):
        assert metric_steps(client, run.info.run_id, key) == metric_steps(
            client, like.info.run_id, key
        ), key


def test_sweep_on_postgres_server_survives_requeue_and_signal(
    server: TeamServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """As alice, whose credentials reach the jobs through SLURM's environment only."""
    env = {**env_for(tmp_path), "MLFLOW_TRACKING_URI": "", **server.login("alice")}
    log = tmp_path / "sweep.log"
    proc = launch("tracking=server", f"tracking.uri={server.uri}", "latent_dim=2,3,4", *TRAIN,
                  env=env, log=log)  # fmt: skip
    try:
        folder = sweep_folder(tmp_path / "runs")
        requeued, signalled = job_id(folder, 0), job_id(folder, 1)
        for num in (0, 1):  # mid-training: an epoch's checkpoint is written
            wait_for(f"job {num} training", (folder / str(num) / "checkpoint.json").is_file)
        subprocess.run(["scontrol", "requeue", requeued], check=True)  # what preemption does
        subprocess.run(["scancel", "--signal=TERM", signalled], check=True)  # a signal only
        release(requeued)
        release(signalled)
        assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        proc.kill()
    client = server.admin(monkeypatch)
    parent, children = sweep_of(client)
    assert parent.info.status == "FINISHED"
    assert [r.info.status for r in children] == ["FINISHED"] * 3
    first, second, untouched = children
    for run in (first, second):
        assert run.data.tags["resumed_from"] == "auto"
        assert_whole(client, run, untouched)
    assert "resumed_from" not in untouched.data.tags
    assert metric_steps(client, untouched.info.run_id, "test/loss") == list(range(1, 13))
    job_logs = [(folder / str(n) / "app.log").read_text() for n in (0, 1)]
    assert all("resumed at epoch" in text for text in job_logs)
    assert "requeueing through submitit" in job_logs[1]  # only signalled: it requeued itself
    for run in children:
        images = {f.path.split("+")[0] for f in client.list_artifacts(run.info.run_id, "images")}
        assert {"images/latent", "images/samples"} <= images
        film = {f.path for f in client.list_artifacts(run.info.run_id, "film")}
        assert {"film/latent.gif", "film/frames.npz"} <= film
    report = {f.path for f in client.list_artifacts(parent.info.run_id, "report")}
    assert "report/report.html" in report
    assert not (tmp_path / "runs" / "mlflow.db").exists()  # everything went to the server
    password = server.passwords["alice"]  # nowhere but in the jobs' environment
    for run in [parent, *children]:
        assert password not in str({**run.data.params, **run.data.tags}), run.info.run_name
    written = [p for p in tmp_path.rglob("*") if p.is_file()]  # submitit's files included
    assert list(folder.glob(".submitit/*/*_submitted.pkl"))
    assert not [p for p in written if password.encode() in p.read_bytes()]


def test_the_postgres_team_server_stops_a_refused_or_read_only_user_first(
    server: TeamServer, monkeypatch: pytest.MonkeyPatch, own_http_settings: None
):
    """The check a run makes before its data, against users kept in PostgreSQL."""
    for user, password, said in [
        (None, None, "the server refused the credentials (401); none were given"),
        ("alice", "not-hers", "the server refused the credentials of user 'alice' (401)"),
        ("bob", None, "user 'bob' may read but not write the experiment 'vaeexp'"),
        ("alice", None, None),
    ]:
        for k, v in server.login(user, password).items():
            monkeypatch.setenv(k, v)
        if said is None:
            check_reachable(server.uri, "vaeexp")
            continue
        with pytest.raises(TrackingUnavailable) as refused:
            check_reachable(server.uri, "vaeexp")
        assert str(refused.value).startswith(f"tracking.uri={server.uri}: {said}")


def test_a_request_no_node_can_hold_stops_before_submitting(tmp_path: Path):
    env = env_for(tmp_path)
    before = squeue("-o", "%i")
    # A submitted job would wait in the queue for ever: the timeout catches that, on any machine.
    result = run_cli(*SLURM, "hydra.launcher.cpus_per_task=512", "latent_dim=2,3", env=env)
    assert result.returncode == 2
    [line] = [x for x in result.stderr.splitlines() if x.strip()]
    assert line.startswith("vaeexp: error: hydra.launcher.cpus_per_task=512: no node of")
    assert f"{os.cpu_count()} CPUs" in line
    assert squeue("-o", "%i") == before  # nothing submitted: not queued, and not written out
    assert not list(tmp_path.rglob(".submitit")), "submitit wrote a job to submit"
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_ctrl_c_cancels_the_jobs_and_resume_auto_continues_the_sweep(tmp_path: Path):
    env = env_for(tmp_path)
    args = ["latent_dim=2,3,4", *TRAIN]
    one_by_one = "hydra.launcher.array_parallelism=1"  # one finishes, one stops, one never starts
    proc = launch(one_by_one, *args, env=env, log=tmp_path / "first.log")
    folder = sweep_folder(tmp_path / "runs")
    wait_for("job 1 training", (folder / "1" / "checkpoint.json").is_file)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    said = (tmp_path / "first.log").read_text()
    assert "cancelled the sweep's SLURM jobs (scancel" in said
    assert "resume=auto" in said
    array = job_id(folder, 0).split("_")[0]
    wait_for("the jobs gone from the queue", lambda: array not in squeue("-o", "%i"), 60)
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    parent, children = sweep_of(client)
    assert parent.info.status == "KILLED"
    assert [r.info.status for r in children] == ["FINISHED", "KILLED"]  # the third never started
    finished = children[0]

    again = run_cli(*SLURM, *args, "resume=auto", env=env, timeout=400)  # side by side now
    assert again.returncode == 0, again.stderr[-3000:]
    same, children = sweep_of(client)
    assert same.info.run_id == parent.info.run_id and same.info.status == "FINISHED"
    assert [r.info.status for r in children] == ["FINISHED"] * 3
    assert children[0].info.end_time == finished.info.end_time  # not trained again
    assert children[1].data.tags["resumed_from"] == "auto"
    assert_whole(client, children[1], children[2])


def test_a_bad_value_stops_the_sweep_before_it_submits(tmp_path: Path):
    before = squeue("-o", "%i")
    result = run_cli(*SLURM, "latent_dim=2,-1", *QUICK, env=env_for(tmp_path), timeout=240)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "vaeexp: error: job #1 (latent_dim=-1): latent_dim=-1 is not allowed: must be an "
        "integer >= 1"
    ]
    assert squeue("-o", "%i") == before  # nothing submitted: not queued, and not written out
    assert not list(tmp_path.rglob(".submitit")), "submitit wrote a job to submit"
    assert not (tmp_path / "runs").exists()  # no store, no run, no sweep folder


def test_a_job_that_exits_with_its_line_ends_the_sweep_with_it(tmp_path: Path):
    """A job that fails as it starts (it continues an MLflow run that does not exist) exits
    with vaeexp's one line; without accounting, submitit would wait forever for a job that
    wrote no result. Its sweep ends with that line, its parent FAILED with the jobs counted."""
    env = env_for(tmp_path)
    missing = "0" * 32
    result = run_cli(*SLURM, f"resume=null,{missing}", *QUICK, env=env, timeout=240)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"vaeexp: error: resume={missing} ")
    assert f": resume={missing}: no such MLflow run in " in last
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("vaeexp").experiment_id])
    [parent] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "FAILED"
    assert (parent.data.tags["jobs.finished"], parent.data.tags["jobs.failed"]) == ("1", "1")
    [failed] = [r for r in runs if r.info.status == "FAILED" and r is not parent]
    assert failed.data.tags["failure_reason"].startswith(f"CheckpointError: resume={missing}: ")
