"""Benchmark: bare pyvmomi PropertyCollector read vs. VSphereSource.discover() on 1,000 VMs.

    python bench/bench_vsphere_raw.py [--repeat 5] [--flags '{"vm": 125, ...}']

Starts vcsim with `-dc 2 -cluster 2 -host 4 -standalone-host 2 -vm 125 -pg 4 -folder 2`
(2 x (2 + 2) x 125 = 1,000 VMs) and prints the best of N runs of (a) the bare read of the VM
properties and (b) discover(), in seconds, and their ratio. Both include login and logout.
`bare_property_read(...)` is importable for the end-to-end benchmark.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from oma.plugins.vsphere.source import VM_PROPERTIES, VSphereSource  # noqa: E402
from tests.vcsim import THOUSAND_VMS, running_vcsim  # noqa: E402


def bare_property_read(host: str, port: int, username: str, password: str,
                       properties: tuple[str, ...] = VM_PROPERTIES, page: int = 500) -> dict:
    """Log in, read `properties` of every VM in one ContainerView + RetrievePropertiesEx +
    ContinueRetrievePropertiesEx pass, log out. Returns {"seconds", "vm_count"}: the floor
    any discovery through pyvmomi can reach (the time is mostly pyvmomi's XML parsing)."""
    from pyVim.connect import Disconnect, SmartConnect
    from pyVmomi import vim, vmodl

    pcq = vmodl.query.PropertyCollector
    started = time.perf_counter()
    si = SmartConnect(host=host, port=port, user=username, pwd=password, disableSslCertValidation=True)
    try:
        content = si.RetrieveContent()
        view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
        spec = pcq.FilterSpec(
            objectSet=[pcq.ObjectSpec(obj=view, skip=True, selectSet=[
                pcq.TraversalSpec(name="view", path="view", skip=False, type=vim.view.ContainerView)])],
            propSet=[pcq.PropertySpec(type=vim.VirtualMachine, all=False, pathSet=list(properties))])
        pc = content.propertyCollector
        count = 0
        result = pc.RetrievePropertiesEx([spec], pcq.RetrieveOptions(maxObjects=page))
        while result is not None:
            count += len(result.objects)
            if not result.token:
                break
            result = pc.ContinueRetrievePropertiesEx(result.token)
        view.DestroyView()
    finally:
        Disconnect(si)
    return {"seconds": time.perf_counter() - started, "vm_count": count}


def time_discover(connection) -> dict:
    """Time one VSphereSource.discover(): {"seconds", "vm_count"}."""
    started = time.perf_counter()
    vms = asyncio.run(VSphereSource(connection).discover())
    return {"seconds": time.perf_counter() - started, "vm_count": len(vms)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs of each; the best is reported")
    parser.add_argument("--flags", type=json.loads, default=THOUSAND_VMS, help="vcsim flags as JSON")
    args = parser.parse_args()

    bares, discs = [], []
    with running_vcsim(args.flags) as sim:
        for _ in range(args.repeat):  # interleaved, so drift (GC, CPU frequency) hits both alike
            bares.append(bare_property_read(sim.host, sim.port, sim.username, sim.password))
            discs.append(time_discover(sim.connection()))
    bare = min(bares, key=lambda r: r["seconds"])
    disc = min(discs, key=lambda r: r["seconds"])
    ratio = disc["seconds"] / bare["seconds"]
    print(f"vcsim flags: {args.flags}")
    print(f"bare PropertyCollector read : {bare['seconds']:.2f} s  ({bare['vm_count']} VMs)")
    print(f"VSphereSource.discover()    : {disc['seconds']:.2f} s  ({disc['vm_count']} VMs)")
    print(f"ratio discover / bare       : {ratio:.2f}x")


if __name__ == "__main__":
    main()
