"""vaeexp.slurm's reading of SLURM, against stand-in `sinfo` and `scontrol` commands that print
what SLURM prints: these run anywhere. The launcher on a real cluster: tests/cluster/."""

from __future__ import annotations

from pathlib import Path

import pytest

from vaeexp import slurm
from vaeexp.validate import ConfigError

SINFO = """\
small1|2|7800|(null)|cpu*
small2|2|7800|(null)|cpu*
big|64|515000|gpu:a100:4(S:0-1)|gpu
"""


@pytest.fixture
def commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Put stand-ins for SLURM's commands first on PATH; `commands(name, output)` makes one."""

    def make(name: str, output: str) -> None:
        (tmp_path / f"{name}.out").write_text(output)
        script = tmp_path / name
        script.write_text(
            f'#!/bin/sh\necho "$@" > {tmp_path}/{name}.args\ncat {tmp_path}/{name}.out\n'
        )
        script.chmod(0o755)

    monkeypatch.setenv("PATH", f"{tmp_path}:{Path('/usr/bin')}:{Path('/bin')}")
    return make


def test_nodes_of_the_default_or_a_named_partition(commands):
    commands("sinfo", SINFO)
    assert [n.name for n in slurm.partition_nodes(None)] == ["small1", "small2"]
    [big] = slurm.partition_nodes("gpu")
    assert (big.cpus, big.mem_mb, big.gpus) == (64, 515000, 4)


def test_a_request_that_fits_a_node_passes(commands):
    commands("sinfo", SINFO)
    slurm.check_request({"cpus_per_task": 2, "mem_gb": 7})
    slurm.check_request({"partition": "gpu", "cpus_per_task": 8, "gpus_per_node": 4})


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"cpus_per_task": 4, "mem_gb": 2}, "hydra.launcher.cpus_per_task=4:"),
        ({"cpus_per_task": 1, "mem_gb": 8}, "hydra.launcher.mem_gb=8:"),
        ({"cpus_per_task": 1, "gpus_per_node": 1}, "hydra.launcher.gpus_per_node=1:"),
        ({"partition": "gpu", "mem_gb": 600}, "hydra.launcher.mem_gb=600:"),
    ],
)
def test_a_request_no_node_can_hold_names_the_setting_and_the_nodes(commands, params, named):
    commands("sinfo", SINFO)
    with pytest.raises(ConfigError) as e:
        slurm.check_request(params)
    assert str(e.value).startswith(named)
    assert "CPUs" in str(e.value) and "GB" in str(e.value)


def test_an_unknown_partition_is_refused(commands):
    commands("sinfo", SINFO)
    with pytest.raises(ConfigError, match=r"hydra\.launcher\.partition=gpus: SLURM has no such"):
        slurm.check_request({"partition": "gpus"})


def test_no_sinfo_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConfigError, match="cannot ask SLURM what its nodes have"):
        slurm.check_request({})


@pytest.mark.parametrize(
    ("line", "restarts", "fate"),
    [
        ("JobId=7 ArrayJobId=6 ArrayTaskId=1 JobState=RUNNING Restarts=0", "", ("RUNNING", False)),
        ("JobId=7 JobState=COMPLETING Restarts=1", "", ("COMPLETING", True)),  # being requeued
        ("JobId=7 JobState=COMPLETING Restarts=1", "1", ("COMPLETING", False)),  # cancelled
    ],
)
def test_job_fate_reads_this_array_task(commands, monkeypatch, tmp_path, line, restarts, fate):
    commands("scontrol", line + "\n")
    monkeypatch.setenv("SLURM_JOB_ID", "6")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "6")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_RESTART_COUNT", restarts)
    assert slurm.job_fate() == fate
    assert (tmp_path / "scontrol.args").read_text().split() == ["show", "job", "-o", "6_1"]


def test_cancelling_names_the_jobs_it_cancelled(commands, tmp_path, caplog):
    commands("scancel", "")
    folder = tmp_path / ".submitit"
    for name in ("12_0", "12_1", "12"):
        (folder / name).mkdir(parents=True)
    slurm.cancel_jobs(folder)
    assert (tmp_path / "scancel.args").read_text().split() == ["12"]
    assert "scancel 12" in caplog.text
