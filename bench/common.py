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
    while time.perf_counter() - started < timeout:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return proc, base, time.perf_counter() - started
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"oma-api exited with {proc.returncode}")
        time.sleep(0.02)
    proc.kill()
    raise SystemExit("oma-api did not become healthy")
