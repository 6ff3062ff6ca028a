"""Benchmark of the export_manager service (a script, not a test).

Per backend: the service alone on an embedded NATS and in-memory SQLite; N disks ensured
concurrently over the bus (time until every reply, reloads spent), then the same N ensured
again (reuse: latency per request, reloads must stay unchanged), then a reconcile.

    python bench/bench_exports.py [--disks 100] [--backend nbdkit --backend nbd-server]
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from nbdutil import MiB, free_port, missing_tools, sparse_file

from oma.runner import Appliance
from oma.shared.settings import Settings
from oma.shared.subjects import Exports


async def bench(backend: str, disks: int, workdir: Path) -> dict:
    settings = Settings(data_dir=workdir / backend, export_backend=backend, nbd_port=free_port())
    devs = [sparse_file(workdir / f"{backend}-{i}.img", 16 * MiB) for i in range(disks)]
    vm_id = str(uuid.uuid4())
    bodies = [{"vm_id": vm_id, "disk_unit_number": i, "vm_name": "bench", "device_path": str(d)}
              for i, d in enumerate(devs)]
    async with Appliance(settings, ("export_manager",)) as app:
        svc = app.services["export_manager"]
        exp = svc.exporter

        async def ensure(body: dict) -> tuple[float, dict]:
            t = time.perf_counter()
            r = await svc.bus.call(Exports.ENSURE, body, timeout=120)
            return time.perf_counter() - t, r

        t0 = time.perf_counter()
        created = await asyncio.gather(*(ensure(b) for b in bodies))
        burst = time.perf_counter() - t0
        reloads = exp.reloads
        assert all(r["action"] == "created" for _, r in created)
        await asyncio.gather(*(exp.check_export(r["export_name"]) for _, r in created))

        reuse = [(await ensure(b))[0] for b in bodies]        # one at a time: per-request latency
        assert exp.reloads == reloads, "reuse must not reload"
        t0 = time.perf_counter()
        report = await svc.bus.call(Exports.RECONCILE, {}, timeout=120)
        reconcile = time.perf_counter() - t0
    return {"backend": backend, "disks": disks, "burst_s": burst, "reloads": reloads,
            "reuse_median_ms": statistics.median(reuse) * 1000, "reconcile_s": reconcile,
            "reconcile_changes": len(report["readded"]) + len(report["removed"])}


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--disks", type=int, default=100)
    ap.add_argument("--backend", action="append", choices=["nbdkit", "nbd-server"])
    args = ap.parse_args()
    if missing_tools():
        raise SystemExit(f"missing: {', '.join(missing_tools())}")
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        for backend in args.backend or ["nbdkit", "nbd-server"]:
            r = await bench(backend, args.disks, Path(tmp))
            print(f"{r['backend']:>10}: {r['disks']} concurrent ensures in {r['burst_s']:.2f}s "
                  f"({r['reloads']} reloads); reuse median {r['reuse_median_ms']:.1f} ms; "
                  f"reconcile {r['reconcile_s'] * 1000:.0f} ms ({r['reconcile_changes']} changes)")


if __name__ == "__main__":
    asyncio.run(main())
