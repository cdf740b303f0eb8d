import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from mlflow.tracking import MlflowClient


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening_addresses(port: int) -> set[str]:
    """Local addresses in LISTEN state on `port`, read from the kernel's own table."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for row in Path(table).read_text().splitlines()[1:]:
            local, state = row.split()[1], row.split()[3]
            address, port_hex = local.split(":")
            if state == "0A" and int(port_hex, 16) == port:
                found.add(address)
    return found


def test_ui_serves_the_store_on_loopback_only(store):
    client = MlflowClient(store["MLFLOW_TRACKING_URI"])
    experiment = client.create_experiment("vaeexp")
    run = client.create_run(experiment, run_name="probe")
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "vaeexp.ui", "--port", str(port)],
        env={**os.environ, **store},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "UI did not come up"
            time.sleep(0.5)
        remote = MlflowClient(f"http://127.0.0.1:{port}")
        found = remote.search_runs([experiment])
        assert [r.info.run_id for r in found] == [run.info.run_id]
        assert _listening_addresses(port) == {"0100007F"}  # 127.0.0.1, nothing else
        url = f"http://127.0.0.1:{port}/#/experiments/{experiment}?workflowType=machine_learning"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert f"open {url}" in proc.stdout.read()
