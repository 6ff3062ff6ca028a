"""Benchmark of the NBD exporters (a script, not a test).

Per backend, in the same run:
- write SIZE of random data (--rounds times, medians printed) into an export with `nbdcopy --flush`, and the same bytes with
  `dd bs=4M conv=fdatasync` into a local file on the same filesystem; print MB/s and the ratio
  NBD/local (target >= 0.6);
- add N new exports concurrently and time until every one answers a real NBD_OPT_GO.

    python bench/bench_nbd.py [--size-mib 1024] [--exports 100] [--backend nbdkit --backend nbd-server]
    python bench/bench_nbd.py --backend nbdkit --tls      # the same through TLS-PSK (nbds:// URIs)

Scratch files live under /var/tmp (or --dir) and are deleted at the end. ~1 minute on loopback.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from nbdutil import MiB, digest, free_port, missing_tools, random_file, sparse_file  # noqa: E402
from oma.plugins.nbd import ExporterConfig, NbdkitExporter, NbdServerExporter  # noqa: E402

BACKENDS = {"nbdkit": NbdkitExporter, "nbd-server": NbdServerExporter}


def timed(argv: list[str]) -> float:
    os.sync()                    # start from clean page cache writeback, or the previous run's flush is billed
    t = time.monotonic()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.monotonic() - t


async def bench_backend(name: str, work: Path, src: Path, size: int, n_exports: int, rounds: int,
                        tls: bool = False) -> dict:
    exp = BACKENDS[name](ExporterConfig(port=free_port(), state_dir=work / f"state-{name}", tls=tls))
    await exp.start()
    try:
        local_times, nbd_times = [], []
        for _ in range(rounds):               # alternate, so both see the same machine state
            local = work / f"local-{name}.img"
            local_times.append(timed(["dd", f"if={src}", f"of={local}", "bs=4M", "conv=fdatasync", "status=none"]))
            local.unlink()
            dev = sparse_file(work / f"export-{name}.img", size)
            await exp.add_export("bench", str(dev))
            nbd_times.append(timed(["nbdcopy", "--flush", str(src), exp.uri("bench")]))
            ok = digest(dev) == digest(src) if len(nbd_times) == rounds else True
            await exp.remove_export("bench")
            dev.unlink()
        t_local, t_nbd = statistics.median(local_times), statistics.median(nbd_times)

        devs = [sparse_file(work / f"many-{name}-{i}.img", 16 * MiB) for i in range(n_exports)]
        reloads = exp.reloads
        t0 = time.monotonic()
        await asyncio.gather(*(exp.add_export(f"many-{i}", str(d)) for i, d in enumerate(devs)))
        t_added = time.monotonic() - t0
        sem = asyncio.Semaphore(16)

        async def check(i: int) -> int:
            async with sem:
                return await exp.check_export(f"many-{i}")
        sizes = await asyncio.gather(*(check(i) for i in range(n_exports)))
        t_connectable = time.monotonic() - t0
        assert sizes == [16 * MiB] * n_exports
        return {"backend": name + (" tls" if tls else ""), "version": exp.version_string, "local_mbs": size / 1e6 / t_local,
                "nbd_mbs": size / 1e6 / t_nbd,
                "rounds": [f"{size / 1e6 / a:.0f}/{size / 1e6 / b:.0f}" for a, b in zip(local_times, nbd_times)], "ratio": t_local / t_nbd, "verified": ok,
                "exports": n_exports, "added_s": t_added, "connectable_s": t_connectable,
                "reloads": exp.reloads - reloads}
    finally:
        await exp.stop()


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--exports", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3, help="write rounds per backend; medians are printed")
    ap.add_argument("--backend", action="append", choices=list(BACKENDS))
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--tls", action="store_true", help="nbdkit with TLS-PSK (--tls=require)")
    args = ap.parse_args()
    if missing := missing_tools():
        print(f"missing tools: {', '.join(missing)}", file=sys.stderr)
        return 2
    size = args.size_mib * MiB
    work = Path(tempfile.mkdtemp(prefix="oma-bench-nbd-", dir=args.dir))
    try:
        t = time.monotonic()
        src = random_file(work / "random.bin", size)
        print(f"# {size // MiB} MiB of random data in {work} ({time.monotonic() - t:.1f}s to generate), "
              f"{os.cpu_count()} CPUs")
        results = []
        for name in args.backend or list(BACKENDS):
            results.append(r := await bench_backend(name, work, src, size, args.exports, args.rounds, args.tls))
            print(f"{r['backend']:<11} local dd {r['local_mbs']:7.0f} MB/s | nbdcopy --flush {r['nbd_mbs']:7.0f} MB/s"
                  f" | ratio {r['ratio']:.2f} {'OK' if r['ratio'] >= 0.6 else 'BELOW 0.6'}"
                  f" | bytes {'verified' if r['verified'] else 'MISMATCH'}"
                  f" | {r['exports']} exports added in {r['added_s']:.2f}s ({r['reloads']} reloads),"
                  f" all connectable after {r['connectable_s']:.2f}s  [{r['version']}]"
                  f"\n{'':<10} rounds local/nbd MB/s: {', '.join(r['rounds'])}", flush=True)
        return 0 if all(r["verified"] for r in results) else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
