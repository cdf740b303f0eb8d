"""The config (vaeexp.config): every bad value is refused with one line naming the key, before
data or MLflow is touched; and what names a run and what makes it another training."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import make_cfg, run_cli
from vaeexp.config import Binarize, Optimizer, identity, plain, run_name, settings


@pytest.mark.slow  # `python -m vaeexp` for each bad value
@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("latent_dim=0", "latent_dim=0 is not allowed: must be an integer >= 1"),
        ("batch_size=-5", "batch_size=-5 is not allowed: must be an integer >= 1"),
        ("epsilon_std=abc", "epsilon_std=abc is not allowed: must be a number"),
        ("epsilon_std=-1", "epsilon_std=-1.0 is not allowed: must be a finite number >= 0"),
        ("epsilon_std=nan", "epsilon_std=nan is not allowed: must be a finite number >= 0"),
        ("laten_dim=2", "unknown setting 'laten_dim' (did you mean 'latent_dim'?)"),
        ("+latnet_dim=4", "unknown setting 'latnet_dim' (did you mean 'latent_dim'?)"),
        ("+film.fpss=4", "unknown setting 'film.fpss' (did you mean 'film.fps'?)"),
        (
            "data=nope",
            "data=nope is not a known choice; allowed: fashion_mnist, kmnist, mnist, mnist_bundled",
        ),
        ("optimizer=sgd", "optimizer=sgd is not allowed: must be one of rmsprop, adam"),
        ("epochs=1.5", "epochs=1.5 is not allowed: must be an integer"),
        ("lr=0", "lr=0.0 is not allowed: must be a finite number > 0"),
        ("kl_weight=-1", "kl_weight=-1.0 is not allowed: must be a finite number >= 0"),
        (
            "kl_warmup_epochs=-2",
            "kl_warmup_epochs=-2 is not allowed: must be an integer >= 0 (0: no warm-up)",
        ),
        (
            "data.binarize=maybe",
            "data.binarize=maybe is not allowed: must be one of none, static, dynamic",
        ),
        (
            "data.fallback=perhaps",
            "data.fallback=perhaps is not allowed: must be null (no fallback) or a data config: "
            "fashion_mnist, kmnist, mnist, mnist_bundled",
        ),
        (
            "data._target_=nosuch.Dataset",
            "data._target_=nosuch.Dataset is not allowed: must name a dataset class such as "
            "torchvision.datasets.MNIST",
        ),
        (
            "data.mirrors=[]",
            "data.mirrors=[] is not allowed: must be null (the dataset's own mirrors) or a list "
            "of base URLs",
        ),
        (
            "resume=/no/such/run",
            "resume=/no/such/run is not allowed: must be auto, a run folder, a checkpoint file "
            "or an MLflow run id",
        ),
    ],
)
def test_bad_value_one_line_nonzero_nothing_created(store, override, expected):
    result = run_cli(override, "epochs=1", env=store)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"vaeexp: error: {expected}" + lines[0].partition(expected)[2]], lines
    assert expected in lines[0]
    runs = Path(store["VAEEXP_RUNS"])
    assert not (runs / "mlflow.db").exists()  # no MLflow run was created
    assert not Path(store["VAEEXP_DATA"]).exists()  # no data was loaded or downloaded


@pytest.mark.slow  # three `python -m vaeexp` processes
def test_help_cfg_and_info_work_like_any_hydra_app(store):
    help_ = run_cli("--help", env=store)
    assert (
        help_.returncode == 0
        and "data: fashion_mnist, kmnist, mnist, mnist_bundled" in help_.stdout
    )
    assert "experiment: reference" in help_.stdout
    assert "kl_weight: 1.0" in help_.stdout and "kl_warmup_epochs: 0" in help_.stdout
    cfg = run_cli("--cfg", "job", "latent_dim=8", "data=fashion_mnist", env=store)
    assert (
        cfg.returncode == 0
        and "latent_dim: 8" in cfg.stdout
        and "name: fashion_mnist" in cfg.stdout
    )
    info = run_cli("--info", env=store)
    assert info.returncode == 0 and "Config search path" in info.stdout


def test_reference_experiment_pins_keras_values():
    cfg = make_cfg("experiment=reference")
    assert (cfg.latent_dim, cfg.intermediate_dim, cfg.batch_size, cfg.epochs) == (2, 256, 100, 50)
    assert cfg.optimizer == Optimizer.rmsprop and (cfg.lr, cfg.rho, cfg.eps) == (1e-3, 0.9, 1e-7)
    assert (
        cfg.epsilon_std == 1.0 and cfg.data.binarize == Binarize.none and cfg.init.value == "glorot"
    )
    assert (cfg.kl_weight, cfg.kl_warmup_epochs) == (1.0, 0)  # the ELBO itself
    assert make_cfg("experiment=reference", "latent_dim=8").latent_dim == 8  # the CLI still wins


def test_tracking_uri_defaults_to_project_store_and_env_overrides(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("VAEEXP_RUNS", raising=False)
    from vaeexp.paths import PROJECT_ROOT

    assert make_cfg().tracking.uri == f"sqlite:///{PROJECT_ROOT / 'runs' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert make_cfg().tracking.uri == "http://127.0.0.1:5999"
    assert make_cfg("tracking.uri=sqlite:////x.db").tracking.uri == "sqlite:////x.db"


@pytest.mark.slow  # two `python -m vaeexp -m`
def test_dry_run_validates_every_job_of_a_sweep_without_training(store):
    ok = run_cli("-m", "latent_dim=2,8", "batch_size=50,100", "dry_run=true", env=store)
    assert ok.returncode == 0, ok.stderr
    listed = [line for line in ok.stdout.splitlines() if line.startswith("vaeexp: dry run")]
    assert len(listed) == 4 and "job 3 is valid: latent_dim=8 batch_size=100" in listed[3]
    bad = run_cli("-m", "latent_dim=2,0", "dry_run=true", env=store)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == (
        "vaeexp: error: latent_dim=0 is not allowed: must be an integer >= 1"
    )
    assert not (Path(store["VAEEXP_RUNS"]) / "mlflow.db").exists()  # no run, no data, no training
    assert not Path(store["VAEEXP_DATA"]).exists()


@pytest.mark.slow  # a Python process per command
@pytest.mark.parametrize(
    "command",
    [
        ["-m", "vaeexp", "--help"],
        ["-m", "vaeexp", "latent_dim=8", "dry_run=true"],
        ["-m", "vaeexp.compare", "--help"],
        ["-m", "vaeexp.film", "--help"],
        ["-m", "vaeexp.iwae", "--help"],
        ["-m", "vaeexp.sync", "--help"],
        ["-m", "vaeexp.ui", "--help"],
    ],
)
def test_small_commands_never_import_torchvision(command, store):
    out = subprocess.run(
        [sys.executable, "-X", "importtime", *command],
        capture_output=True,
        text=True,
        env={**os.environ, **store},
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    # importtime lists every module imported, nested ones indented below their importer
    assert not re.search(r"\|\s+torchvision(\.|$)", out.stderr, re.M)


@pytest.mark.parametrize("override", ["kl_weight=4", "kl_warmup_epochs=2"])
def test_kl_settings_are_part_of_what_a_run_trains(override):
    """Another KL weight or warm-up is another run: `resume=auto` and a resumed sweep never
    continue one with the other, and its name says it."""
    default, other = (plain(settings(make_cfg(*o))) for o in ([], [override]))
    assert identity(other, epochs=False) != identity(default, epochs=False)
    assert identity(other) != identity(default)
    assert identity([override, "tracking.uri=x"]) == [tuple(override.split("="))]
    assert run_name(["epochs=5", override]) == f"epochs=5,{override}"


def test_run_name_keeps_what_changes_training():
    overrides = [
        "latent_dim=8",
        "+foo=1",
        "tracking.uri=x",
        "runtime.progress=false",
        "data=kmnist",
        "hydra.run.dir=/x",
        "runtime.device=cpu",
        "resume=/a/b",
        "iwae.k=5",
        "hydra/launcher=joblib",
    ]
    assert run_name(overrides) == "latent_dim=8,foo=1,data=kmnist"
    assert run_name([]) == "defaults"
