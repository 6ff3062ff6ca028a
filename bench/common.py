"""What the benchmark scripts share: start `oma-api` as a process and wait until it is healthy."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from shared.natsserver import free_port  # noqa: E402

TOKEN = "vma_test_token_abc123def456789012345678"


def start_oma_api(*flags: str, env: dict[str, str] | None = None, timeout: float = 60.0,
                  stderr: Any = subprocess.DEVNULL) -> tuple[subprocess.Popen, str, float]:
    """`oma-api -port <free> -host 127.0.0.1 FLAGS` with a fresh data dir and the seed's appliance
    token; returns the process, its base URL and the seconds it took to answer /health with 200.
    `stderr` (a file) keeps its log."""
    port = free_port()
    full_env = {**os.environ, "OMA_DATA_DIR": tempfile.mkdtemp(prefix="oma-bench-"),
                "OMA_NBD_PORT": str(free_port()), "OMA_APPLIANCE_TOKENS": f"test-vma={TOKEN}", **(env or {})}
    started = time.perf_counter()
    proc = subprocess.Popen(["oma-api", "-port", str(port), "-host", "127.0.0.1", *flags], env=full_env,
                            stdout=subprocess.DEVNULL, stderr=stderr)
    base = f"http://127.0.0.1:{port}"
    wait_healthy([proc], base, timeout)
    return proc, base, time.perf_counter() - started


def wait_healthy(procs: list[subprocess.Popen], base: str, timeout: float, path: str = "/health") -> None:
    """Until `base + path` answers 200; SystemExit when a process exits or the time is up."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        try:
            if httpx.get(f"{base}{path}", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        for proc in procs:
            if proc.poll() is not None:
                raise SystemExit(f"{proc.args[0]} exited with {proc.returncode}")
        time.sleep(0.02)
    for proc in procs:
        proc.kill()
    raise SystemExit(f"{base} did not become healthy")


def process_tree(pids: list[int]) -> list[int]:
    """The pids and all their descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], list(pids)
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out
