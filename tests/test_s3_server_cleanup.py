"""The S3 servers the tests start never outlive the pytest that started them: not after a normal
end, and not after pytest itself is SIGKILLed (the teardown never runs then)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import remove_seaweedfs_sockets, wait_for

pytestmark = pytest.mark.integration  # it starts SeaweedFS

PROBE = textwrap.dedent("""
    import os, time

    def test_hold(seaweedfs_server):
        open(os.environ["PROBE_READY"], "w").write(seaweedfs_server)
        time.sleep(float(os.environ["PROBE_HOLD_S"]))
""")
RUN_TIMEOUT_S = 180


def processes_under(folder: Path) -> list[int]:
    """Processes whose working folder lies under ``folder`` (the servers run in their temp folders)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and Path(os.readlink(entry / "cwd")).is_relative_to(folder):
                found.append(int(entry.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def start_probe(tmp_path: Path, name: str, hold_s: float) -> tuple[subprocess.Popen, Path, Path]:
    """A pytest of its own (this suite's fixtures as a plugin) whose one test holds a SeaweedFS server."""
    basetemp, ready = tmp_path / f"{name}-tmp", tmp_path / f"{name}.ready"
    (tmp_path / f"test_{name}.py").write_text(PROBE)
    env = {**os.environ, "PROBE_READY": str(ready), "PROBE_HOLD_S": str(hold_s)}
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
                             f"--basetemp={basetemp}", str(tmp_path / f"test_{name}.py")],
                            cwd=Path(__file__).parent.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wait_for(lambda: ready.exists() or proc.poll() is not None, RUN_TIMEOUT_S, "the probe's server")
    assert ready.exists(), proc.communicate()[0].decode(errors="replace")[-3000:]
    return proc, basetemp, ready


def test_no_server_outlives_pytest(tmp_path):
    # given: a pytest run holding a SeaweedFS server, that ends normally
    proc, basetemp, _ = start_probe(tmp_path, "ends", hold_s=0)
    assert proc.wait(timeout=RUN_TIMEOUT_S) == 0, proc.communicate()[0].decode(errors="replace")[-3000:]

    # then: its server is gone
    assert processes_under(basetemp) == []

    # given: a pytest run holding a SeaweedFS server (seen running)
    proc, basetemp, _ = start_probe(tmp_path, "killed", hold_s=600)
    servers = processes_under(basetemp)
    assert servers
    command = Path(f"/proc/{servers[0]}/cmdline").read_bytes().decode().split("\0")
    try:
        # when: pytest itself is SIGKILLed, so no teardown runs
        proc.send_signal(signal.SIGKILL)
        proc.wait()

        # then: the server dies with it
        wait_for(lambda: not processes_under(basetemp), 30, "the server to die with pytest")
    finally:
        for pid in processes_under(basetemp):  # this test's own strays, were it to fail
            os.kill(pid, signal.SIGKILL)
        remove_seaweedfs_sockets(command)  # the killed run's teardown never removed them
