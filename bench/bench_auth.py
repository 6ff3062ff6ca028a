"""Authenticated GET through the gateway, with and without the verification cache.

    python bench/bench_auth.py [path] [seconds] [memory|mariadb]

Starts `oma-api` (memory, or MariaDB on 127.0.0.1:3306 as root, database oma_bench_auth) twice (OMA_AUTH_CACHE_TTL=5, then 0), logs in with the seed's
appliance token, and drives `GET path` with wrk (1 thread, 16 connections) for the given seconds.
Prints requests/s and p99 latency for each. Needs Debian's `wrk`.
"""
from __future__ import annotations

import re
import signal
import subprocess
import sys

import httpx
from common import TOKEN, start_oma_api


def start(cache_ttl: str, db: str) -> tuple[subprocess.Popen, str]:
    flags = ["-db-type", db]
    if db == "mariadb":
        flags += ["-db-host", "127.0.0.1", "-db-user", "root", "-db-name", "oma_bench_auth"]
    proc, base, _ = start_oma_api(*flags, env={"OMA_AUTH_CACHE_TTL": cache_ttl})
    return proc, base


def run(cache_ttl: str, path: str, seconds: int, db: str) -> tuple[float, str]:
    proc, base = start(cache_ttl, db)
    try:
        token = httpx.post(f"{base}/api/v1/auth/login",
                           json={"appliance_id": "test-vma", "token": TOKEN}).json()["session_token"]
        url = f"{base}{path}"
        assert httpx.get(url, headers={"Authorization": f"Bearer {token}"}).status_code == 200
        out = subprocess.run(["wrk", "-t1", "-c16", f"-d{seconds}s", "--latency", "-H",
                              f"Authorization: Bearer {token}", url], capture_output=True, text=True).stdout
        rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
        p99 = re.search(r"99%\s+(\S+)", out).group(1)
        if "Non-2xx" in out:
            raise SystemExit(f"non-2xx answers under load:\n{out}")
        return rps, p99
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else "/api/v1/vm-contexts?limit=10"
    seconds = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    db = sys.argv[3] if len(sys.argv) > 3 else "memory"
    for label, ttl in (("with cache (5 s)", "5"), ("without cache", "0")):
        rps, p99 = run(ttl, path, seconds, db)
        print(f"GET {path} [{db}] {label}: {rps:.0f} req/s, p99 {p99} (wrk -t1 -c16 -d{seconds}s)")


if __name__ == "__main__":
    main()
