"""Shared fixtures: tiny data, a temporary MLflow store, and the CLI as a user runs it; and the
`slow` mark on every test of the scenario folders (docs/running.md, "Tests")."""

from __future__ import annotations

import os

# Under pytest-xdist (pyproject's addopts: two workers), one torch thread per worker and per
# process it starts: two workers of torch's default threads on 2 cores spin against each other
# (docs/sweeps.md, "Parallel jobs never oversubscribe the CPU"). Set before anything imports torch.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import functools
import gzip
import hashlib
import http.server
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from vaeexp.config import register
from vaeexp.paths import CONF_DIR

register()

TESTS = Path(__file__).parent
# Whole runs, sweeps, servers and signals, and the real cluster: slow, every one of them. Module
# tests under tests/vaeexp/ that start a process are marked one by one.
SLOW_FOLDERS = (TESTS / "scenarios", TESTS / "cluster")


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marks, and xdist groups by them
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if any(folder in item.path.parents for folder in SLOW_FOLDERS):
            item.add_marker(pytest.mark.slow)
        # The tests that share a module's own fixture (a whole run, a sweep, a venv) run on one
        # worker, so that it is built once, not once a worker.
        shared = sorted(
            name
            for name, defs in item._fixtureinfo.name2fixturedefs.items()
            if defs[-1].scope == "module" and defs[-1].baseid == item.parent.nodeid
        )
        if shared and item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(f"{item.parent.nodeid}::{shared[0]}"))


# Small and fast: a few hundred of the bundled digits, no progress bar.
TINY = [
    "data=mnist_bundled",
    "data.train_limit=400",
    "data.test_limit=100",
    "runtime.progress=false",
]


def make_cfg(*overrides: str) -> DictConfig:
    """The config exactly as `python -m vaeexp <overrides>` composes it."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


IDX_FILES = (  # MNIST's four files, as its family of datasets names them
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def write_fake_idx_set(
    folder: Path, n_train: int = 60, n_test: int = 20, seed: int = 0, gzipped: bool = True
) -> dict[str, str]:
    """MNIST's four IDX files (gzipped, or unpacked as torchvision keeps them) with random
    pixels; returns each file's MD5."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = (
        rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, n_train, dtype=np.uint8),
        rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, n_test, dtype=np.uint8),
    )
    md5s = {}
    for name, array in zip(IDX_FILES, arrays, strict=True):
        body = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
        body += array.tobytes()
        name = name if gzipped else name.removesuffix(".gz")
        (folder / name).write_bytes(gzip.compress(body, mtime=0) if gzipped else body)
        md5s[name] = hashlib.md5((folder / name).read_bytes()).hexdigest()
    return md5s


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """An empty project runs/ folder and SQLite MLflow store for one test, as env for the CLI."""
    env = {
        "VAEEXP_RUNS": str(tmp_path / "runs"),
        "VAEEXP_DATA": str(tmp_path / "data"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


def run_cli(
    *args: str,
    env: dict[str, str] | None = None,
    module: str = "vaeexp",
    timeout: float = 300,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess:
    """`python -m vaeexp ...` in a subprocess, from a neutral working folder."""
    full_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    full_env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=cwd or tempfile.gettempdir(),
    )


def start_cli(*args: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    """`python -m vaeexp ...` in the background, as a user starts it, its output in `log`."""
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "vaeexp", *args],
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
            stdout=out,
            stderr=out,
        )


def wait_for(what: str, ready: Callable[[], object], timeout: float = 240) -> object:
    """Poll `ready` until it returns something true; fail, naming `what`, after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := ready():
            return value
        time.sleep(0.1)
    raise AssertionError(f"waited {timeout:.0f} s for {what}")


def sweep_runs(uri: str, experiment: str = "vaeexp"):
    """(client, parent, children) of the one sweep in the store's experiment."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    [parent] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r is not parent]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    return client, parent, children


def sweep_of(client):
    """(parent, children by latent_dim) of the one sweep in the store's `vaeexp` experiment."""
    runs = client.search_runs([client.get_experiment_by_name("vaeexp").experiment_id])
    [parent] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = sorted(
        (r for r in runs if r is not parent), key=lambda r: r.data.params["latent_dim"]
    )
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    return parent, children


def metric_steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def image_steps(client, run_id: str, key: str) -> list[int]:
    """The steps of a run's step-wise images of `key`, one per image logged."""
    files = [f.path for f in client.list_artifacts(run_id, "images")]
    pattern = re.compile(rf"images/{key}\+step\+(\d+)\+timestamp\+\d+\+[\w-]+\.png$")
    return sorted(int(m.group(1)) for f in files if (m := pattern.match(f)))


def env_for(root: Path) -> dict[str, str]:
    """The environment that points a CLI run at a project runs/ folder and store under root."""
    return {
        "VAEEXP_RUNS": str(root / "runs"),
        "VAEEXP_DATA": str(root / "data"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'runs' / 'mlflow.db'}",
    }


def only_run(env: dict[str, str]):
    """(client, experiment, run) for a store holding exactly one run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("vaeexp")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return client, experiment, runs[0]


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass


@pytest.fixture
def http_root(tmp_path: Path):
    """A real HTTP server on 127.0.0.1 serving a temporary folder; yields (folder, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_Handler, directory=str(root))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mlflow_server(
    root: Path, port: int, backend: str | None = None, auth: dict[str, str] | None = None
) -> subprocess.Popen:
    """A real tracking server on 127.0.0.1 with its own store (SQLite unless `backend` names a
    database) and artifact folder, which it serves; with `auth` (`basic_auth`), MLflow's
    basic-auth app. One worker process, and none of the eight that run MLflow's server jobs
    (GenAI evaluations, which vaeexp never asks for): starting them costs several times the
    CPU of the server itself."""
    import urllib.request

    app = ["--app-name", "basic-auth"] if auth else []
    quiet = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            *app,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            backend or f"sqlite:///{root / 'server.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
        ],
        cwd=root,
        env={**os.environ, **quiet, **(auth or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group, which a test may pause as a whole
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            assert proc.poll() is None, "mlflow server exited"
            time.sleep(0.5)
    proc.kill()
    raise AssertionError("mlflow server did not come up")


def basic_auth(root: Path, admin_password: str, users: str | None = None) -> dict[str, str]:
    """The team server of docs/cluster.md (step 1): its auth.ini, word for word
    but for the admin's password and the users' database (SQLite in `root` unless `users` names
    one), and a session key: the environment `mlflow server --app-name basic-auth` needs."""
    import configparser
    import re
    import secrets
    import textwrap

    from vaeexp.paths import PROJECT_ROOT

    page = (PROJECT_ROOT / "docs" / "cluster.md").read_text()
    [block] = re.findall(r"```ini\n(.*?)```", page, re.S)
    ini = configparser.ConfigParser()
    ini.read_string(textwrap.dedent(block))
    ini["mlflow"]["database_uri"] = users or f"sqlite:///{root / 'basic_auth.db'}"
    ini["mlflow"]["admin_password"] = admin_password
    path = root / "auth.ini"
    with path.open("w") as f:
        ini.write(f)
    return {
        "MLFLOW_AUTH_CONFIG_PATH": str(path),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32),
    }


def as_user(name: str, password: str) -> dict[str, str]:
    """The environment that makes MLflow's client (and so vaeexp) log in as `name`."""
    return {"MLFLOW_TRACKING_USERNAME": name, "MLFLOW_TRACKING_PASSWORD": password}


@pytest.fixture
def own_http_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """For a test that calls check_reachable in-process: the HTTP settings it gives MLflow
    (outbox.fail_fast_over_http) end with the test, not with the worker process."""
    for var in ("MAX_RETRIES", "BACKOFF_FACTOR", "TIMEOUT"):
        monkeypatch.setenv(f"MLFLOW_HTTP_REQUEST_{var}", "")  # remembers how it was ...
        monkeypatch.delenv(f"MLFLOW_HTTP_REQUEST_{var}")  # ... and leaves it unset for the test


class TeamServer:
    """The team server of docs/cluster.md, steps 1 and 2, on 127.0.0.1: MLflow's basic-auth app over
    `backend` (SQLite in `root` unless given), its users in `users`; the admin has made alice,
    who may write the experiment `vaeexp`, and bob, who may only read it (the default)."""

    def __init__(self, root: Path, backend: str | None = None, users: str | None = None):
        import secrets

        from mlflow.server import get_app_client

        # Passwords nothing else contains, to look for everywhere.
        self.passwords = {n: f"{n}-{secrets.token_hex(8)}" for n in ("admin", "alice", "bob")}
        port = free_port()
        self.uri = f"http://127.0.0.1:{port}"
        self.proc = mlflow_server(
            root, port, backend, auth=basic_auth(root, self.passwords["admin"], users)
        )
        try:
            with pytest.MonkeyPatch.context() as mp:
                client = self.admin(mp)
                auth = get_app_client("basic-auth", tracking_uri=self.uri)
                auth.create_user("alice", self.passwords["alice"])
                auth.create_user("bob", self.passwords["bob"])
                experiment = client.create_experiment("vaeexp")
                auth.grant_user_permission("alice", "experiment", experiment, "EDIT")
        except BaseException:
            self.stop()
            raise

    def login(self, user: str | None, password: str | None = None) -> dict[str, str]:
        """The environment of a user (None: no credentials at all)."""
        return as_user(user, password or self.passwords[user]) if user else as_user("", "")

    def admin(self, monkeypatch: pytest.MonkeyPatch):
        """An MlflowClient of the admin's, for this test (monkeypatch keeps the login)."""
        from mlflow.tracking import MlflowClient

        for k, v in self.login("admin").items():
            monkeypatch.setenv(k, v)
        return MlflowClient(self.uri)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="session")
def empty_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty SQLite MLflow store, made once a session: its schema migrations take seconds,
    a copy does not."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("empty-mlflow") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def mlflow_store(tmp_path: Path, empty_db: Path):
    """(client, uri) of a real, empty SQLite MLflow store of this test's own."""
    from mlflow.tracking import MlflowClient

    shutil.copy(empty_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return MlflowClient(uri), uri


@pytest.fixture
def working(mlflow_store, tmp_path: Path):
    """(client, uri, run id) of a running run in a store of this test's own."""
    client, uri = mlflow_store
    experiment = client.create_experiment("vaeexp", str(tmp_path / "mlartifacts"))
    return client, uri, client.create_run(experiment).info.run_id


@pytest.fixture
def down(monkeypatch: pytest.MonkeyPatch):
    """(client, uri) of a tracking server that is not there: every call is refused at once."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    uri = f"http://127.0.0.1:{free_port()}"
    return MlflowClient(uri), uri
