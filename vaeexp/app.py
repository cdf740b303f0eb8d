"""`python -m vaeexp`: compose the config with Hydra, train, track in MLflow.

Config and data errors end with one line naming the setting and what is allowed, and a non-zero
exit; anything else is a bug and keeps its full traceback.
"""

from __future__ import annotations

import logging
import os
import sys

import hydra
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from vaeexp import process
from vaeexp.config import register
from vaeexp.paths import CONF_DIR
from vaeexp.validate import ConfigError, explain


def register_launcher() -> None:
    """Hydra finds launchers by listing the `hydra_plugins` namespace, which an editable
    install's import hook does not list: register vaeexp's (`hydra/launcher=slurm`,
    `hydra/launcher=stacked`) by hand."""
    from hydra.core.plugins import Plugins

    from hydra_plugins.vaeexp_launcher import SlurmLauncher, StackedLauncher

    Plugins.instance().register(SlurmLauncher)
    Plugins.instance().register(StackedLauncher)


register()
register_launcher()
log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def task(cfg: DictConfig) -> float:
    """Train one job (vaeexp.recipe); returns its final test loss, which sweepers minimise."""
    process.prepare()  # a launcher's worker runs this task without main()
    from vaeexp.recipe import recipe_main
    from vaeexp.step import Diverged

    try:
        # A sweep's job that diverges scores a finite penalty (vaeexp.recipe); a run that
        # diverges ends FAILED and tagged `diverged`, and says so here.
        (loss,) = recipe_main(cfg)  # a job of a launcher other than the stacked one
        return loss
    except Diverged as e:
        _exit_with(e)
    except Exception as e:
        if not isinstance(e, _user_errors()) or os.environ.get("VAEEXP_TRACEBACK") == "1":
            raise
        # SystemExit passes through Hydra, which would print a banner above any Exception.
        _exit_with(e)


def _user_errors() -> tuple[type[BaseException], ...]:
    from vaeexp.checkpoint import CheckpointError
    from vaeexp.data import DataUnavailable
    from vaeexp.slurm import JobExited
    from vaeexp.step import Diverged
    from vaeexp.tracking.outbox import DeliveryIncomplete
    from vaeexp.tracking.store import TrackingUnavailable

    return (
        ConfigError,
        TrackingUnavailable,
        DeliveryIncomplete,
        HydraException,
        OmegaConfBaseException,
        DataUnavailable,
        CheckpointError,
        Diverged,
        JobExited,
    )


def _exit_with(e: BaseException) -> None:
    config_error = isinstance(e, ConfigError | HydraException | OmegaConfBaseException)
    print(f"vaeexp: error: {explain(e) if config_error else e}", file=sys.stderr)
    sys.exit(2 if config_error else 1)


def main() -> None:
    """Console entry point. HYDRA_FULL_ERROR=1 or VAEEXP_TRACEBACK=1 show full tracebacks."""
    process.prepare(signals=True)
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        os.environ["VAEEXP_TRACEBACK"] = "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # composition errors reach us, not Hydra's printer
    try:
        task()
    except KeyboardInterrupt:
        from vaeexp.sweep import interrupted

        if not interrupted():
            print(
                "vaeexp: interrupted; an MLflow run it had started is marked KILLED",
                file=sys.stderr,
            )
        sys.exit(130)
    except SystemExit:  # its line is said; and no need to import all that _user_errors() names
        raise
    except _user_errors() as e:
        if os.environ.get("VAEEXP_TRACEBACK") == "1":
            raise
        _exit_with(e)
    finally:
        from vaeexp.sweep import stopped

        stopped()  # a job's error ended the sweep before its end: its parent ends FAILED
