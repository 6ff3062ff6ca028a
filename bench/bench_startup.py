"""Start-up time of `oma-api -db-type memory` to a healthy /health, and its resident memory.

    python bench/bench_startup.py [rounds]

Resident memory is the RSS of oma-api and every process under it (the embedded nats-server, the
gateway workers of OMA_PROCESSES > 1), read from /proc after the appliance became healthy and
answered one /health.
"""
from __future__ import annotations

import os
import signal
import statistics
import sys
import time

from common import process_tree, start_oma_api


def rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def one_round() -> tuple[float, int, int, float]:
    proc, _, ready = start_oma_api("-db-type", "memory", timeout=120)
    under = process_tree([proc.pid])[1:]
    nats = [p for p in under if open(f"/proc/{p}/comm").read().strip() == "nats-server"]
    api = sum(rss_kib(p) for p in under if p not in nats) + rss_kib(proc.pid)
    nats_rss = sum(rss_kib(p) for p in nats)
    t1 = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    proc.wait(10)
    return ready, api, nats_rss, time.perf_counter() - t1


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    results = [one_round() for _ in range(rounds)]
    ready = [r[0] for r in results]
    print(f"oma-api memory mode, OMA_PROCESSES={os.environ.get('OMA_PROCESSES', 'auto')}, {rounds} rounds")
    print(f"  start to healthy: median {statistics.median(ready):.2f} s (min {min(ready):.2f}, max {max(ready):.2f})")
    print(f"  RSS oma-api (all its processes): median {statistics.median(r[1] for r in results) / 1024:.0f} MiB; "
          f"embedded nats-server: {statistics.median(r[2] for r in results) / 1024:.0f} MiB; "
          f"total {statistics.median(r[1] + r[2] for r in results) / 1024:.0f} MiB")
    print(f"  SIGTERM to exit: median {statistics.median(r[3] for r in results):.2f} s")


if __name__ == "__main__":
    main()
