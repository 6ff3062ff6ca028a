"""Benchmark of the VMA simulator's copy (a script, not a test).

In one run, against one nbdkit server and a real vcsim: VMS VMs x 2 disks x SIZE are replicated
at once through `oma-vma-sim` (in-process, libnbd writers) into file-backed exports, timed from the
first `POST /replicate` to the last `completed`; then `nbdcopy --flush` copies the very same source
files into fresh exports of the same server, all at once. Prints both aggregate MB/s and the ratio
simulator/nbdcopy (the issue's goal: >= 0.8), and checks every target's sha256.

    python bench/bench_vma_sim.py [--vms 1] [--size-mib 1024] [--density 1.0]

Scratch files live under /var/tmp (or --dir) and are deleted at the end.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from common import nbdcopy_seconds, run_in_scratch  # noqa: E402

from nbdutil import MiB, digest, free_port, sparse_file  # noqa: E402
from oma.plugins.nbd import ExporterConfig, NbdkitExporter  # noqa: E402
from oma.plugins.vma.client import HttpVmaClient  # noqa: E402
from oma.plugins.vma.simulator import VmaSimulator  # noqa: E402
from oma.shared.vma import DiscoverRequest, NbdTarget, ReplicateRequest  # noqa: E402
from vcsim import DiskSpec, create_vm, running_vcsim  # noqa: E402


async def run(args: argparse.Namespace, work: Path) -> None:
    size = args.size_mib * MiB
    exp = NbdkitExporter(ExporterConfig(port=free_port(), state_dir=work / "state", watchdog_interval=0))
    await exp.start()
    try:
        with running_vcsim(username="u", password="p") as vc:
            with vc.service_instance() as si:
                for i in range(args.vms):
                    create_vm(si, f"bench{i}", disks=[DiskSpec(size / 2**30), DiskSpec(size / 2**30)])
            creds = {"vcenter": f"{vc.host}:{vc.port}", "username": "u", "password": "p"}
            async with VmaSimulator(work / "vma", density=args.density, verify_tls=False) as sim, \
                    HttpVmaClient(sim.url) as client:
                vms = [v for v in (await client.discover(DiscoverRequest(**creds))).vms
                       if v.name.startswith("bench")]
                jobs, files = [], []
                for n, vm in enumerate(vms):
                    targets = []
                    for d in vm.disks:
                        name = f"sim{n}-{d.id}"
                        files.append((vm, d, sparse_file(work / f"{name}.img", size)))
                        await exp.add_export(name, str(files[-1][2]))
                        targets.append(NbdTarget(device_path=exp.uri(name), vmware_disk_key=d.id[5:]))
                    jobs.append(ReplicateRequest(job_id=f"bench-{n}", vm_paths=[vm.path], nbd_targets=targets,
                                                 **creds))
                # Create the source disks before timing (a replication creates them on first use).
                for vm in vms:
                    full = next(v for v in await vc_discover(vc) if v["path"] == vm.path)
                    for d in full["disks"]:
                        await sim.source_disk(creds["vcenter"], full, d)
                t0 = time.monotonic()
                await asyncio.gather(*(client.replicate(j) for j in jobs))
                while True:
                    states = [(await client.progress(j.job_id)).status for j in jobs]
                    if all(s in ("completed", "failed") for s in states):
                        break
                    await asyncio.sleep(0.05)
                t_sim = time.monotonic() - t0
                assert set(states) == {"completed"}, states
                sources = [sim.disk_path(creds["vcenter"], vm.path, d.id[5:]) for vm, d, _ in files]
                ok = all(digest(f) == digest(s) for (_, _, f), s in zip(files, sources))

                copies = []
                for i, src in enumerate(sources):
                    dev = sparse_file(work / f"cp{i}.img", size)
                    await exp.add_export(f"cp{i}", str(dev))
                    copies.append((str(src), exp.uri(f"cp{i}")))
                t_cp = await nbdcopy_seconds(copies)
        total = len(sources) * size
        print(f"{len(sources)} disks x {args.size_mib} MiB (density {args.density}), nbdkit file exports")
        print(f"  oma-vma-sim (libnbd) : {total / t_sim / 1e6:8.1f} MB/s  ({t_sim:.2f} s)  sha256 equal: {ok}")
        print(f"  nbdcopy --flush      : {total / t_cp / 1e6:8.1f} MB/s  ({t_cp:.2f} s)")
        print(f"  ratio sim/nbdcopy    : {t_cp / t_sim:8.2f}   (goal >= 0.8)")
    finally:
        await exp.stop()


async def vc_discover(vc) -> list[dict]:
    from oma.plugins.vsphere.source import VSphereSource
    return await VSphereSource(vc.connection()).discover()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vms", type=int, default=1)
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--density", type=float, default=1.0)
    p.add_argument("--dir", default="/var/tmp")
    args = p.parse_args()
    run_in_scratch(run, args, "bench-vma-sim-")


if __name__ == "__main__":
    main()
