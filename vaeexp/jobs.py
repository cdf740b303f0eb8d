"""Every job of a sweep, composed and validated in the launching process before the first one
starts, whatever launcher runs them.

Jobs run by joblib, submitit or SLURM are composed in other processes, after the sweep's parent
run and folder exist, and Hydra's basic launcher composes each job only as it reaches it: a bad
value in the tenth job would stop a sweep after nine jobs' work and leave the sweep behind.

The jobs are the sweeper's own: Hydra's basic sweeper expands the overrides into its grid
(`BasicSweeper.split_arguments`); the Optuna sweeper's search space, parsed by Hydra's override
parser, has each choice and both ends of each range or interval checked, one setting at a time,
the other searched ones at their defaults (each of vaeexp's rules is about one setting, and allows
an interval of numbers). Hydra's config loader composes each job exactly as a launcher will.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig, open_dict, read_write

from vaeexp.validate import ConfigError, explain, validate

BASIC = "BasicSweeper"
OPTUNA = "OptunaSweeper"


def validate_sweep(
    config: DictConfig, jobs: Sequence[Sequence[str]] | None = None
) -> list[DictConfig]:
    """Compose and validate every job of the sweep `config` describes (a sweep's config, as Hydra
    hands it to callbacks and launchers), or the `jobs` given as lists of overrides; returns the
    jobs' configs. Raises ConfigError with one line naming the job (by the settings its sweep
    varies) and the setting."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    errors = (ConfigError, HydraException, OmegaConfBaseException)
    loader = GlobalHydra.instance().config_loader()
    try:
        named = sweep_jobs(config, loader) if jobs is None else _numbered(jobs, set())
    except errors as e:  # an override the sweeper cannot expand
        raise ConfigError(explain(e)) from None
    composed = []
    for name, overrides in named:
        try:
            job = loader.load_sweep_config(config, overrides)
            validate(task_config(job))
        except errors as e:
            raise ConfigError(f"{name}: {explain(e)}") from None
        composed.append(job)
    return composed


def sweep_jobs(config: DictConfig, loader: Any) -> list[tuple[str, list[str]]]:
    """(name, overrides) of each job the sweeper will launch; for Optuna, of each job that
    reaches a choice or a bound of its search space. Another sweeper's jobs are not known
    before it runs: its settings that are not searched make one job."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    sweeper = config.hydra.sweeper
    params = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
    arguments = [*params, *config.hydra.overrides.task]
    overrides = OverridesParser.create(config_loader=loader).parse_overrides(arguments)
    kind = str(sweeper.get("_target_", "")).rpartition(".")[2]
    swept = {o.get_key_element() for o in overrides if o.is_sweep_override()}
    if kind == BASIC:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

        [grid] = BasicSweeper.split_arguments(overrides, None)
        return _numbered(grid, swept)
    # As the Optuna sweeper reads them: a setting given a plain value anywhere is not searched.
    fixed = {
        o.get_key_element(): o.get_value_element_as_str()
        for o in overrides
        if not o.is_sweep_override()
    }
    searched = {o.get_key_element(): o for o in overrides if o.is_sweep_override()}
    searched = {k: o for k, o in searched.items() if k not in fixed}
    base = [f"{k}={v}" for k, v in fixed.items()]
    if kind != OPTUNA:
        return [("every job", base)]
    jobs = [("every trial", base)]
    for key, override in searched.items():
        name = f"the Optuna search space {override.input_line}"
        jobs += [(name, [*base, f"{key}={value}"]) for value in _reach(override)]
    return jobs


def _numbered(jobs: Sequence[Sequence[str]], swept: set[str]) -> list[tuple[str, list[str]]]:
    """Each job named as Hydra numbers it, by the settings swept (all of them if none is)."""
    named = []
    for num, job in enumerate(jobs):
        shown = [o for o in job if o.split("=", 1)[0] in swept] or list(job)
        named.append((f"job #{num} ({' '.join(shown) or 'defaults'})", list(job)))
    return named


def _reach(override: Any) -> list[Any]:
    """What Optuna can sample of a searched setting, as the plugin reads the override
    (`create_optuna_distribution_from_override`; read here without importing Optuna): every
    choice, and both ends of a range (its stop included) or of an interval."""
    from hydra.core.override_parser.types import Transformer

    value = override.value()
    if override.is_choice_sweep() or (override.is_range_sweep() and value.shuffle):
        return list(override.sweep_iterator(transformer=Transformer.encode))
    if override.is_range_sweep():
        return [value.start, value.stop]
    return [value.start, value.end]


def task_config(job: DictConfig) -> DictConfig:
    """A job's config as its task sees it: without Hydra's own node (as Hydra's run_job)."""
    task = copy.deepcopy(job)
    with read_write(task), open_dict(task):
        del task["hydra"]
    return task
