"""The API path against a bare FastAPI endpoint, side by side in one run (issue 19).

    python bench/bench_api.py [--seconds 5] [--warmup 2] [--runs 3] [--connections 8]
                              [--db memory,mariadb] [--layouts aio,split] [--processes auto]
                              [--vms 2000] [--jobs-per-vm 10] [--memory-vms 300]

Targets, all on loopback with the gateway's uvicorn configuration (uvloop, httptools, the guarded
protocol, no access log):
- `bare`: a FastAPI handler returning a small dict;
- `<db> aio/P<n>`: one `oma-api` (-db-type memory or mariadb) with OMA_PROCESSES=n (the default: what
  `--processes` says, "auto" and/or numbers, comma-separated);
- `<db> split`: `oma-service NAME` for the gateway and each service, one process each (compose's layout).
Each is driven with wrk (1 thread, `--connections`, `--seconds` after `--warmup` unmeasured) on the
authenticated `GET /api/v1/vm-contexts` (first page, 100 contexts) and `GET /api/v1/vm-contexts/{vm}`
(a random VM per request, a wrk Lua script), round-robin: one run of every target, then the next run (`--runs`),
so that the machine's noise falls on all of them alike. Printed: medians of the runs of req/s, the
ratio to the bare endpoint measured in the same round, p50/p99, and the CPU each request cost the
target's processes (utime+stime from /proc of the process tree, nats-server included; MariaDB not).

Seeding: MariaDB targets get `--vms` contexts with `--jobs-per-vm` jobs, 2 disks and 2 CBT records per
completed job, bulk-inserted (bench_contexts.py); `oma-api` uses its embedded NATS. A memory database
lives inside its process, so memory targets are fed real replication events (10 per job, 2 jobs per
VM) through a nats-server of this script's (`-nats-url`, OMA_ALLOW_EPHEMERAL_WITH_EXTERNAL_NATS).

Needs wrk (Debian: `apt-get install wrk`) and, for MariaDB, 127.0.0.1:3306 as root (or OMA_TEST_DB_*).
The machine may be shared: compare the ratios of one run, not absolute figures across runs.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import httpx
from common import ROOT, TOKEN, free_port, oma_command, process_tree, start_oma_api, wait_healthy

from oma.shared.bus import Bus
from oma.shared.natsserver import EmbeddedNats
from oma.shared.settings import SERVICES
from oma.shared.subjects import EVENTS_STREAM
from tests.mariadbutil import MARIADB, mariadb_exec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_contexts import T0, bulk_insert, job_events  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
LIST = "/api/v1/vm-contexts"


# --- the bare endpoint, run as `bench_api.py --bare PORT` in its own process --------------------
def serve_bare(port: int) -> None:
    import uvicorn
    from fastapi import FastAPI

    from oma.services.gateway.server import uvicorn_config
    from oma.loop import run as run_loop
    from oma.shared.settings import Settings

    app = FastAPI()

    @app.get("/bare")
    async def bare():
        return {"status": "ok", "service": "bare", "count": 1}

    settings = Settings(host="127.0.0.1", port=port)
    run_loop(uvicorn.Server(uvicorn_config(app, settings)).serve())


# --- CPU of a process tree ---------------------------------------------------------------------
def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in process_tree(pids):
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / CLK_TCK


# --- targets -----------------------------------------------------------------------------------
@dataclass
class Target:
    name: str
    base: str
    procs: list[subprocess.Popen] = field(default_factory=list)
    roots: list[int] = field(default_factory=list)  # pids whose trees are this target's CPU
    token: str = ""
    vm_prefix: str = ""
    vms: int = 0
    cleanup: list = field(default_factory=list)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


def login(base: str) -> str:
    r = httpx.post(f"{base}/api/v1/auth/login", json={"appliance_id": "test-vma", "token": TOKEN}, timeout=30)
    r.raise_for_status()
    return r.json()["session_token"]


def db_flags(db: str, db_name: str | None) -> list[str]:
    if db == "memory":
        return ["-db-type", "memory"]
    return ["-db-type", "mariadb", "-db-host", MARIADB["host"], "-db-port", str(MARIADB["port"]), "-db-name", db_name,
            "-db-user", MARIADB["user"]]


def db_env(db: str) -> dict[str, str]:
    env = {"OMA_DB_PASS": MARIADB["password"]}
    if db == "memory":
        env["OMA_ALLOW_EPHEMERAL_WITH_EXTERNAL_NATS"] = "true"
    return env


def start_split(flags: list[str], env: dict[str, str], nats_url: str, log: Path) -> tuple[list[subprocess.Popen], str]:
    """Compose's layout on one machine: every service and the gateway in a process of its own."""
    port = free_port()
    full_env = {**os.environ, "OMA_DATA_DIR": tempfile.mkdtemp(prefix="oma-bench-"),
                "OMA_NBD_PORT": str(free_port()), "OMA_APPLIANCE_TOKENS": f"test-vma={TOKEN}",
                "OMA_METRICS_PORT": "0", **env}
    err = log.open("ab")
    service = oma_command("oma_service")
    procs = [subprocess.Popen([*service, name, "-nats-url", nats_url, *flags], env=full_env, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=err) for name in SERVICES]
    procs.append(subprocess.Popen([*service, "gateway", "-nats-url", nats_url, "-host", "127.0.0.1",
                                   "-port", str(port), *flags], env=full_env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                  stderr=err))
    base = f"http://127.0.0.1:{port}"
    wait_healthy(procs, base, 120)
    return procs, base


async def seed_events(nats_url: str, vms: int) -> None:
    """Replication events for `vms` VMs (2 jobs each), applied by the live read-model consumer."""
    import nats
    nc = await nats.connect(nats_url)
    bus = Bus(nc)
    try:
        events = []
        for v in range(vms):
            for j in (0, 1):
                events += job_events(v, j, T0 + timedelta(hours=v, minutes=10 * j))
        for i in range(0, len(events), 1000):
            await asyncio.gather(*(bus.publish_event(s, p, msg_id=p["event_id"]) for s, p in events[i:i + 1000]))
        while True:
            info = await bus.js.consumer_info(EVENTS_STREAM, "context_aggregator-readmodel")
            if info.num_pending == 0 and info.num_ack_pending == 0:
                break
            await asyncio.sleep(0.2)
    finally:
        await nc.drain()


async def build_targets(args: argparse.Namespace, log: Path) -> list[Target]:
    targets: list[Target] = []
    port = free_port()
    bare = subprocess.Popen([sys.executable, __file__, "--bare", str(port)], stdout=subprocess.DEVNULL,
                            stderr=log.open("ab"))
    bare_t = Target("bare FastAPI dict", f"http://127.0.0.1:{port}", [bare], [bare.pid])
    targets.append(bare_t)
    wait_healthy([bare], bare_t.base, 60, path="/bare")

    for db in args.db:
        for layout in args.layouts:
            variants = [f"P{p}" for p in args.processes] if layout == "aio" else ["split"]
            for variant in variants:
                name = f"{db} {'aio ' + variant if layout == 'aio' else 'split'}"
                db_name = None
                if db == "mariadb":
                    db_name = f"oma_bench_api_{uuid.uuid4().hex[:8]}"
                    await mariadb_exec(f"CREATE DATABASE `{db_name}`")
                t = Target(name, "")
                if db_name:
                    t.cleanup.append(f"DROP DATABASE IF EXISTS `{db_name}`")
                targets.append(t)
                flags, env = db_flags(db, db_name), db_env(db)
                nats_url = None
                if db == "memory" or layout == "split":
                    server = EmbeddedNats()
                    nats_url = await server.start()
                    t.cleanup.append(server)
                    t.roots.append(server.proc.pid)
                if layout == "aio":
                    env["OMA_PROCESSES"] = variant[1:]
                    extra = ["-nats-url", nats_url] if nats_url else []
                    proc, t.base, _ = start_oma_api(*flags, *extra, env=env, timeout=120, stderr=log.open("ab"))
                    t.procs = [proc]
                else:
                    t.procs, t.base = start_split(flags, env, nats_url, log)
                t.roots += [p.pid for p in t.procs]
                if db == "mariadb":
                    await bulk_insert(db_name, args.vms, args.jobs_per_vm)
                    t.vm_prefix, t.vms = "bench-vm-", args.vms
                else:
                    await seed_events(nats_url, args.memory_vms)
                    t.vm_prefix, t.vms = "evt-vm-", args.memory_vms
                t.token = login(t.base)
                print(f"started {name} at {t.base}", flush=True)
    return targets


# --- wrk -----------------------------------------------------------------------------------------
def ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text).groups()
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4, "h": 3.6e6}[unit]


def random_vm_script(prefix: str, vms: int, directory: Path) -> Path:
    path = directory / f"{prefix}{vms}.lua"
    path.write_text(f'request = function()\n  return wrk.format("GET", "{LIST}/{prefix}" .. '
                    f'string.format("%05d", math.random(0, {vms - 1})))\nend\n')
    return path


def wrk(t: Target, path: str, script: Path | None, args: argparse.Namespace) -> dict[str, float]:
    cmd = ["wrk", "-t1", f"-c{args.connections}", "--latency"]
    if t.token:
        cmd += ["-H", f"Authorization: Bearer {t.token}"]
    if script:
        cmd += ["-s", str(script)]
    if args.warmup:  # unmeasured: connections open, caches as a polling GUI keeps them
        subprocess.run([*cmd, f"-d{args.warmup}s", t.base + path], capture_output=True)
    cmd.append(f"-d{args.seconds}s")
    before = cpu_seconds(t.roots)
    out = subprocess.run([*cmd, t.base + path], capture_output=True, text=True).stdout
    cpu = cpu_seconds(t.roots) - before
    if "Non-2xx" in out or "Requests/sec" not in out:
        raise SystemExit(f"{t.name} {path}: bad answers under load:\n{out}")
    try:
        rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
        total = int(re.search(r"(\d+) requests in", out).group(1))
        return {"rps": rps, "p50": ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1)),
                "p99": ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1)), "cpu_us": cpu / max(total, 1) * 1e6}
    except (AttributeError, ValueError):
        raise SystemExit(f"{t.name} {path}: cannot read wrk's output:\n{out}") from None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bare", type=int, help=argparse.SUPPRESS)  # the bare server's own process
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2, help="seconds of unmeasured load before each run")
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--db", default="memory,mariadb")
    ap.add_argument("--layouts", default="aio,split")
    ap.add_argument("--processes", default="auto")
    ap.add_argument("--vms", type=int, default=2000, help="MariaDB: contexts bulk-inserted")
    ap.add_argument("--jobs-per-vm", type=int, default=10)
    ap.add_argument("--memory-vms", type=int, default=300, help="memory: VMs fed as events (20 each)")
    args = ap.parse_args()
    if args.bare:
        serve_bare(args.bare)
        return
    if not shutil.which("wrk"):
        raise SystemExit("wrk not found: apt-get install wrk")
    args.db, args.layouts = args.db.split(","), args.layouts.split(",")
    args.processes = args.processes.split(",")

    work = Path(tempfile.mkdtemp(prefix="oma-bench-api-"))
    log = work / "servers.log"
    targets: list[Target] = []
    try:
        targets = asyncio.run(build_targets(args, log))
        cases = [(targets[0], "/bare", None)]
        for t in targets[1:]:
            cases += [(t, LIST, None), (t, f"{LIST}/{{vm}}", random_vm_script(t.vm_prefix, t.vms, work))]
        results: dict[int, list[dict[str, float]]] = {i: [] for i in range(len(cases))}
        for run in range(args.runs):
            for i, (t, path, script) in enumerate(cases):
                results[i].append(wrk(t, path.replace("/{vm}", "/") if script else path, script, args))
            print(f"run {run + 1}/{args.runs} done: " + ", ".join(
                f"{t.name} {path} {results[i][-1]['rps']:.0f}/s p99 {results[i][-1]['p99']:.1f} ms" for i, (t, path, _) in enumerate(cases)), flush=True)
        print(f"\nwrk -t1 -c{args.connections} -d{args.seconds}s after {args.warmup}s unmeasured, "
              f"medians of {args.runs} interleaved runs; "
              f"x bare = median of the per-run ratios to the bare endpoint; CPU = the target's processes")
        print(f"{'target':<24} {'route':<22} {'req/s':>8} {'x bare':>7} {'p50 ms':>7} {'p99 ms':>7} {'CPU us/req':>11}")
        bare_runs = results[0]
        for i, (t, path, _) in enumerate(cases):
            runs = results[i]
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            ratio = statistics.median(r["rps"] / b["rps"] for r, b in zip(runs, bare_runs))
            print(f"{t.name:<24} {path:<22} {med['rps']:>8.0f} {ratio:>7.2f} {med['p50']:>7.2f} "
                  f"{med['p99']:>7.2f} {med['cpu_us']:>11.0f}")
    finally:
        for t in targets:
            t.stop()

        async def cleanup() -> None:
            for t in targets:
                for item in t.cleanup:
                    await (mariadb_exec(item) if isinstance(item, str) else item.stop())
        asyncio.run(cleanup())
        print(f"server logs: {log}")


if __name__ == "__main__":
    main()
