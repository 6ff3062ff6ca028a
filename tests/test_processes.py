"""`oma-api` on several processes (OMA_PROCESSES): the services and the embedded NATS in the parent,
gateway workers under it. One command, one SIGTERM, no process left behind, no secret on a
command line or in an environment."""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from oma.shared import natsauth
from oma.shared.natsauth import read_admin_file
from oma.shared.natsserver import free_port
from tests.procutil import descendants

SEED_TOKEN = "vma_test_token_abc123def456789012345678"


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


class Api:
    def __init__(self, tmp: Path, processes: str):
        self.port = free_port()
        self.data = tmp
        env = {**os.environ, "OMA_DATA_DIR": str(tmp), "OMA_NBD_PORT": str(free_port()),
               "OMA_PROCESSES": processes, "OMA_APPLIANCE_TOKENS": f"test-vma={SEED_TOKEN}"}
        self.log = tmp / "oma-api.log"
        self.proc = subprocess.Popen(["oma-api", "-port", str(self.port), "-host", "127.0.0.1"], env=env,
                                     stdout=subprocess.DEVNULL, stderr=self.log.open("wb"))
        self.base = f"http://127.0.0.1:{self.port}"

    def wait_healthy(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.base}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            time.sleep(0.1)
        raise AssertionError("oma-api did not become healthy:\n" + self.log.read_text()[-3000:])

    def workers(self) -> list[int]:
        return [p for p in descendants(self.proc.pid) if comm(p) != "nats-server"]

    def nbdkit_pid(self) -> int:
        return int((self.data / "exports" / "nbdkit" / "nbdkit.pid").read_text())

    def kill(self) -> None:
        for pid in descendants(self.proc.pid):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(OSError, ValueError):  # the daemon outlives a SIGKILLed parent
            os.kill(self.nbdkit_pid(), signal.SIGTERM)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def api(tmp_path: Path, request):
    started: list[Api] = []

    def start(processes: str) -> Api:
        a = Api(tmp_path, processes)
        started.append(a)
        return a
    yield start
    for a in started:
        a.kill()


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


def test_workers_answer_and_one_sigterm_stops_everything(api):
    a = api("3")
    a.wait_healthy()
    tree = descendants(a.proc.pid)
    workers = a.workers()
    assert len(workers) == 2 and len(tree) == 3, "two gateway workers and the embedded nats-server"

    # Both workers answer on the one port (the parent bound it), each with a valid session.
    token = httpx.post(f"{a.base}/api/v1/auth/login",
                       json={"appliance_id": "test-vma", "token": SEED_TOKEN}).json()["session_token"]
    h = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=a.base, headers=h) as c:
        r = c.get("/api/v1/vm-contexts")
        assert r.status_code == 200 and r.json()["vm_contexts"] == [] and r.json()["total"] == 0
        assert c.get("/api/v1/vm-contexts/nope").status_code == 404
    cpu = {}
    for _ in range(60):  # new connections each: the kernel hands them to either worker
        assert httpx.get(f"{a.base}/api/v1/vm-contexts?limit=5", headers=h).status_code == 200
    for pid in workers:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        cpu[pid] = int(fields[11]) + int(fields[12])
    assert all(cpu.values()), cpu

    # /metrics on the gateway port shows the services' metrics too, each series once.
    text = httpx.get(f"{a.base}/metrics").text
    series = [line.split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")]
    assert len(series) == len(set(series))
    assert 'oma_service_up{service="context_aggregator"} 1.0' in text
    assert re.search(r'oma_bus_requests_total\{(?=[^}]*subject="oma.context_aggregator.context.list")'
                     r'(?=[^}]*status="200")[^}]*\} \d', text)  # the services' process
    assert re.search(r'oma_http_requests_total\{(?=[^}]*route="/api/v1/vm-contexts")[^}]*\} \d', text)  # ours
    assert len([s for s in series if s.startswith("process_cpu_seconds_total")]) == 1

    # The services' NATS passwords reach the workers through a pipe: not on a command line,
    # not in an environment. The nats-server has them all in its environment (by design).
    nats = next(p for p in tree if comm(p) == "nats-server")
    nats_env = dict(kv.split("=", 1) for kv in Path(f"/proc/{nats}/environ").read_text().split("\0") if "=" in kv)
    passwords = [v for k, v in nats_env.items() if k.startswith("NATS_PASSWORD_")]
    assert len(passwords) == len(natsauth.USERS)  # gateway, every service, admin
    for pid in [a.proc.pid, *workers]:
        exposed = Path(f"/proc/{pid}/cmdline").read_text() + Path(f"/proc/{pid}/environ").read_text()
        assert not any(pw in exposed for pw in passwords), pid
    assert not any(pw in a.log.read_text() for pw in passwords)
    assert read_admin_file(a.data) is not None

    t0 = time.monotonic()
    a.proc.send_signal(signal.SIGTERM)
    assert a.proc.wait(timeout=20) == 0
    assert time.monotonic() - t0 < 15
    assert wait_gone(tree, 2) == [], "no process outlives oma-api"
    assert read_admin_file(a.data) is None
    logged = [json.loads(line) for line in a.log.read_text().splitlines() if line.startswith("{")]
    assert any(e["msg"] == "stopped" and e["logger"] == "oma.runner" for e in logged)


def test_sigkill_of_the_parent_leaves_no_child(api):
    a = api("2")
    a.wait_healthy()
    tree = descendants(a.proc.pid)
    assert len(tree) == 2
    os.kill(a.proc.pid, signal.SIGKILL)
    a.proc.wait()
    assert wait_gone(tree, 30) == [], [(p, comm(p)) for p in tree if alive(p)]
    # Nothing that outlives it holds the API's port: nbdkit (a daemon, outside the tree, kept for
    # the VMA's copies) inherited the listening socket while it was inheritable (uvloop's spawn
    # closes only close-on-exec descriptors), and oma-api could not start again on its port.
    assert alive(a.nbdkit_pid()), "nbdkit runs on: this checks what it holds"
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", a.port))
        s.listen()


def test_a_worker_that_dies_stops_the_appliance(api):
    """Half an appliance is worse than none: the supervisor (systemd) restarts the whole."""
    a = api("2")
    a.wait_healthy()
    tree = descendants(a.proc.pid)
    (worker,) = a.workers()
    os.kill(worker, signal.SIGKILL)
    assert a.proc.wait(timeout=30) == 1
    assert wait_gone(tree, 5) == []
    assert "gateway worker exited" in a.log.read_text()


def test_one_process_runs_everything_in_it(api):
    a = api("1")
    a.wait_healthy()
    tree = descendants(a.proc.pid)
    assert [comm(p) for p in tree] == ["nats-server"]
    a.proc.send_signal(signal.SIGTERM)
    assert a.proc.wait(timeout=20) == 0
    assert wait_gone(tree, 2) == []


def test_bad_processes_setting_is_one_line(tmp_path: Path):
    env = {**os.environ, "OMA_DATA_DIR": str(tmp_path), "OMA_PROCESSES": "many"}
    r = subprocess.run(["oma-api", "-port", str(free_port())], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "OMA_PROCESSES" in r.stderr and len(r.stderr.strip().splitlines()) == 1
