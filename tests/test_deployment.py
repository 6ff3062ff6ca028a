"""Deployment files against real tools: promtool and a real Prometheus scraping every service run
alone (`oma-service NAME`) on a nats-server started with ops/nats/nats-server.conf, NATS subject
permissions, compose.yaml against the Compose Specification schema (and docker-compose's own
`config`), the image's build steps, systemd units through `systemd-analyze verify`, dashboards.

Docker itself cannot run here: the image is checked by building the wheel from exactly the
context its Dockerfile copies, and compose.yaml by schema and by docker-compose without an engine.
"""
from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import nats
import pytest
import yaml
from conftest import SEED_TOKEN
from prometheus_client.parser import text_string_to_metric_families

from oma.shared import errors
from oma.shared.bus import Bus
from oma.shared.natsserver import _die_with_parent, find_binary, free_port
from oma.shared.settings import METRICS_PORTS, SERVICES, variables
from oma.shared.subjects import Config, Contexts, Exports, Inventory, health

ROOT = Path(__file__).resolve().parents[1]
PROM_DIR = ROOT / "ops" / "prometheus"
GRAFANA_DIR = ROOT / "ops" / "grafana"
NATS_CONF = ROOT / "ops" / "nats" / "nats-server.conf"
SYSTEMD_DIR = ROOT / "ops" / "systemd"
# The Compose Specification JSON schema as shipped by Debian's docker-compose package (1.29.2,
# `apt-get install docker-compose`), which also gives the `docker-compose config` validator.
COMPOSE_SCHEMA = Path("/usr/lib/python3/dist-packages/compose/config/compose_spec.json")
INSTALL_BIN = "/opt/oma/venv/bin"      # where the units expect the console scripts
NATS_USERS = (*SERVICES, "gateway", "admin")
SETTINGS_ENV = {v.env for v in variables()}
OMA_METRIC = re.compile(r"\boma_[a-z0-9_]+\b")
PROMETHEUS_BUILTINS = {"up"}


def console_script(name: str) -> str:
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    assert found, f"{name} is not installed (pip install -e .)"
    return found


def project_scripts() -> set[str]:
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])


def load_compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def oma_service_of(svc: dict[str, Any]) -> str | None:
    """`oma-service NAME` in a compose service's command -> NAME."""
    cmd = svc.get("command") or []
    return cmd[1] if len(cmd) >= 2 and cmd[0] == "oma-service" else None


def env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def conf_users() -> dict[str, str]:
    """nats-server.conf users -> the environment variable holding each one's password."""
    text = NATS_CONF.read_text()
    return dict(re.findall(r"user:\s*(\w+)\s*\n\s*password:\s*\$(\w+)", text))


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


# ---------------------------------------------------------------------------------------------
# Processes: a nats-server with the project's configuration, services run alone, Prometheus.


class SecuredNats:
    """nats-server with ops/nats/nats-server.conf; passwords through the environment, as in compose."""

    def __init__(self, workdir: Path):
        self.dir = workdir
        self.port = free_port()
        # nats-server parses a variable's value as configuration: letters and digits, a letter first.
        self.passwords = {user: "n" + secrets.token_hex(18) for user in conf_users()}
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        users = conf_users()
        return {**os.environ, **{users[u]: pw for u, pw in self.passwords.items()}}

    async def start(self) -> None:
        log = self.dir / "nats.log"
        # The project's file with its JetStream store moved here; flags override its listen address
        # and monitoring port (the file's are for compose).
        conf = self.dir / "nats-server.conf"
        text, moved = re.subn(r"store_dir: \S+", f"store_dir: {self.dir / 'js'}", NATS_CONF.read_text())
        assert moved == 1
        conf.write_text(text)
        self.proc = subprocess.Popen(
            [find_binary(), "-c", str(conf), "-a", "127.0.0.1", "-p", str(self.port), "-m", str(free_port())],
            env=self.env(), stdout=log.open("wb"), stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        for _ in range(200):
            assert self.proc.poll() is None, f"nats-server exited:\n{tail(log)}"
            with contextlib.suppress(OSError):
                _, w = await asyncio.open_connection("127.0.0.1", self.port)
                w.close()
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"nats-server did not listen:\n{tail(log)}")

    async def connect(self, user: str, errors_seen: list[str] | None = None) -> Any:
        async def on_error(exc: Exception) -> None:
            if errors_seen is not None:
                errors_seen.append(str(exc))
        return await nats.connect(self.url, user=user, password=self.passwords[user], error_cb=on_error,
                                  inbox_prefix=f"_INBOX_{user}",  # as shared/bus.py does
                                  allow_reconnect=False, connect_timeout=3)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@dataclass
class Proc:
    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    port: int                       # /metrics (the gateway: its HTTP port)
    popen: subprocess.Popen | None = None

    def start(self) -> None:
        self.popen = subprocess.Popen(self.argv, env=self.env, stdout=self.log.open("ab"),
                                      stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.popen and self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


@dataclass
class Stack:
    nats: SecuredNats
    procs: dict[str, Proc]
    prom_url: str = ""
    prometheus: subprocess.Popen | None = None
    tmp: Path = field(default_factory=Path)

    @property
    def gateway(self) -> str:
        return f"http://127.0.0.1:{self.procs['gateway'].port}"

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} (exit {p.popen.poll() if p.popen else None}):\n{tail(p.log, 15)}"
                         for p in self.procs.values())


def service_proc(name: str, nats_: SecuredNats, tmp: Path) -> Proc:
    """`oma-service NAME` as a deployment runs it: flags for places, the environment for secrets."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMA_")}
    env.update(OMA_NATS_USER=name, OMA_NATS_PASSWORD=nats_.passwords[name], OMA_DB_TYPE="memory",
               OMA_LOG_FORMAT="json", OMA_STARTUP_TIMEOUT="30", OMA_NBD_PORT=str(free_port()),
               OMA_ALLOW_EPHEMERAL_WITH_EXTERNAL_NATS="true")
    if name == "auth":
        env["OMA_APPLIANCE_TOKENS"] = f"test-vma={SEED_TOKEN}"
    argv = [console_script("oma-service"), name, "-nats-url", nats_.url, "-host", "127.0.0.1",
            "-data-dir", str(tmp / name)]
    argv += ["-port", str(port)] if name == "gateway" else ["-metrics-port", str(port)]
    return Proc(name, argv, env, tmp / f"{name}.log", port)


def prometheus_config(stack: Stack, prom_port: int) -> dict[str, Any]:
    """ops/prometheus/prometheus.yml with its targets moved to the loopback ports of this run."""
    cfg = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    cfg["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    cfg["rule_files"] = [str(PROM_DIR / rule) for rule in cfg["rule_files"]]
    for job in cfg["scrape_configs"]:
        for static in job["static_configs"]:
            moved = []
            for target in static["targets"]:
                host, _, port = target.rpartition(":")
                if host == "localhost" and job["job_name"] == "prometheus":
                    moved.append(f"127.0.0.1:{prom_port}")
                    continue
                name = host.replace("-", "_")
                assert name in stack.procs, f"{job['job_name']}: target {target} is no OMA service"
                expected = 8082 if name == "gateway" else METRICS_PORTS[name]
                assert int(port) == expected, f"{target}: the service listens on {expected}"
                moved.append(f"127.0.0.1:{stack.procs[name].port}")
            static["targets"] = moved
    return cfg


async def get_json(client: httpx.AsyncClient, url: str, **params: Any) -> Any:
    r = await client.get(url, params=params)
    assert r.status_code == 200, (url, r.status_code, r.text[:500])
    body = r.json()
    assert body["status"] == "success", body
    return body["data"]


async def poll(predicate, timeout: float, what: str, interval: float = 0.5, diagnostics=lambda: ""):
    deadline = asyncio.get_running_loop().time() + timeout
    last: Any = None
    while asyncio.get_running_loop().time() < deadline:
        last = await predicate()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"{what} within {timeout:g}s; last: {last}\n{diagnostics()}")


async def gateway_healthy(stack: Stack, client: httpx.AsyncClient) -> Any:
    try:
        r = await client.get(f"{stack.gateway}/health", timeout=5)
    except httpx.HTTPError:
        return None
    return r.json() if r.status_code == 200 else None


@pytest.fixture(scope="module")
async def stack(tmp_path_factory) -> Any:
    tmp = tmp_path_factory.mktemp("deploy")
    server = SecuredNats(tmp)
    await server.start()
    st = Stack(server, {}, tmp=tmp)
    try:
        for name in (*SERVICES, "gateway"):
            st.procs[name] = service_proc(name, server, tmp)
            st.procs[name].start()
        async with httpx.AsyncClient() as client:
            await poll(lambda: gateway_healthy(st, client), 120, "gateway /health 200 with every service up",
                       diagnostics=st.logs)
        prom_port = free_port()
        cfg_path = tmp / "prometheus.yml"
        cfg_path.write_text(yaml.safe_dump(prometheus_config(st, prom_port)))
        st.prom_url = f"http://127.0.0.1:{prom_port}"
        st.prometheus = subprocess.Popen(
            ["prometheus", f"--config.file={cfg_path}", f"--web.listen-address=127.0.0.1:{prom_port}",
             f"--storage.tsdb.path={tmp / 'tsdb'}", "--log.level=warn"],
            stdout=(tmp / "prometheus.log").open("wb"), stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)

        async def ready() -> bool:
            assert st.prometheus.poll() is None, tail(tmp / "prometheus.log")
            try:
                async with httpx.AsyncClient() as client:
                    return (await client.get(f"{st.prom_url}/-/ready")).status_code == 200
            except httpx.HTTPError:
                return False
        await poll(ready, 30, "Prometheus ready", diagnostics=lambda: tail(tmp / "prometheus.log"))
        yield st
    finally:
        if st.prometheus and st.prometheus.poll() is None:
            st.prometheus.terminate()
            st.prometheus.wait(10)
        for proc in reversed(list(st.procs.values())):
            proc.stop()
        server.stop()


async def targets_up(stack: Stack) -> dict[str, str] | None:
    async with httpx.AsyncClient() as client:
        data = await get_json(client, f"{stack.prom_url}/api/v1/targets", state="active")
    health = {t["labels"]["job"]: t["health"] for t in data["activeTargets"]}
    return health if health and all(h == "up" for h in health.values()) else None


# ---------------------------------------------------------------------------------------------
# Prometheus


def test_promtool_accepts_config_and_rules():
    for args in (["check", "config", str(PROM_DIR / "prometheus.yml")],
                 ["check", "rules", str(PROM_DIR / "alerts.yml")]):
        r = subprocess.run(["promtool", *args], check=False, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "SUCCESS" in r.stdout


async def test_prometheus_scrapes_every_service_run_alone(stack: Stack):
    health = await poll(lambda: targets_up(stack), 60, "every Prometheus target up",
                        diagnostics=stack.logs)
    jobs = {job["job_name"] for job in yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())["scrape_configs"]}
    assert set(health) == jobs
    expected = {"oma-" + name.replace("_", "-") for name in (*SERVICES, "gateway")}
    assert expected <= jobs, f"a service has no scrape job: {expected - jobs}"
    # Each service's own metrics arrive under its job.
    async with httpx.AsyncClient() as client:
        data = await get_json(client, f"{stack.prom_url}/api/v1/query", query="oma_service_up == 1")
    running = {(s["metric"]["job"], s["metric"]["service"]) for s in data["result"]}
    assert running == {("oma-" + n.replace("_", "-"), n) for n in SERVICES}


async def test_every_alert_rule_evaluates(stack: Stack):
    async def evaluated() -> list[dict] | None:
        async with httpx.AsyncClient() as client:
            data = await get_json(client, f"{stack.prom_url}/api/v1/rules")
        rules = [r for g in data["groups"] for r in g["rules"]]
        done = rules and all(r.get("lastEvaluation", "").startswith("2") and
                             not r["lastEvaluation"].startswith("0001") for r in rules)
        return rules if done else None
    rules = await poll(evaluated, 30, "every rule evaluated once")
    file_rules = [r for g in yaml.safe_load((PROM_DIR / "alerts.yml").read_text())["groups"] for r in g["rules"]]
    assert len(rules) == len(file_rules)
    bad = {r["name"]: r.get("lastError") for r in rules if r["health"] != "ok"}
    assert not bad, bad


def dashboard_exprs() -> dict[str, list[str]]:
    out = {}
    for path in sorted((GRAFANA_DIR / "dashboards").glob("*.json")):
        board = json.loads(path.read_text())
        panels = [p for top in board["panels"] for p in (top, *top.get("panels", []))]
        exprs = [t["expr"] for p in panels for t in p.get("targets", []) if t.get("expr")]
        exprs += [v["query"] if isinstance(v["query"], str) else v["query"].get("query", "")
                  for v in board.get("templating", {}).get("list", []) if v.get("type") == "query"]
        out[path.name] = exprs
    return out


def alert_exprs() -> list[str]:
    return [r["expr"] for g in yaml.safe_load((PROM_DIR / "alerts.yml").read_text())["groups"] for r in g["rules"]]


def exposed_names(text: str) -> set[str]:
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                    "summary": ("_sum", "_count", "_created")}.get(family.type, ())
        names.update(family.name + s for s in suffixes)
        names.update(s.name for s in family.samples)
    return names


async def test_alert_and_dashboard_metrics_exist(stack: Stack):
    exposed: set[str] = set()
    async with httpx.AsyncClient() as client:
        for proc in stack.procs.values():
            r = await client.get(f"http://127.0.0.1:{proc.port}/metrics")
            assert r.status_code == 200, (proc.name, r.status_code)
            exposed |= exposed_names(r.text)
    used = {"ops/prometheus/alerts.yml": alert_exprs(), **dashboard_exprs()}
    assert set(used) >= {"oma-overview.json", "oma-job-detail.json"}
    missing = {where: sorted({m for e in exprs for m in OMA_METRIC.findall(e)} - exposed)
               for where, exprs in used.items()}
    assert not any(missing.values()), f"metrics no service exports: {missing}"
    # Bare (non-oma) metric names must be Prometheus' own.
    for where, exprs in used.items():
        for expr in exprs:
            for name in re.findall(r"(?<![\w{\"'.$])([a-z_][a-z0-9_]*)\s*\{", expr):
                assert name.startswith("oma_") or name in PROMETHEUS_BUILTINS, (where, name, expr)


async def test_dashboard_queries_parse_in_prometheus(stack: Stack):
    async with httpx.AsyncClient() as client:
        for where, exprs in dashboard_exprs().items():
            assert exprs, f"{where} has no queries"
            for expr in exprs:
                q = expr.replace("$__rate_interval", "1m").replace("$__interval", "15s")
                assert "$" not in q, (where, expr)
                await get_json(client, f"{stack.prom_url}/api/v1/query", query=q)


async def test_service_down_raises_the_alert(stack: Stack):
    await poll(lambda: targets_up(stack), 60, "every target up", diagnostics=stack.logs)
    victim = stack.procs["inventory"]
    victim.stop(signal.SIGKILL)

    async def alert() -> dict | None:
        async with httpx.AsyncClient() as client:
            data = await get_json(client, f"{stack.prom_url}/api/v1/alerts")
        return next((a for a in data["alerts"] if a["labels"]["alertname"] == "OmaServiceDown"), None)
    found = await poll(alert, 30, "OmaServiceDown pending")
    assert found["labels"]["job"] == "oma-inventory" and found["state"] in ("pending", "firing"), found
    # Nothing else is down.
    async with httpx.AsyncClient() as client:
        data = await get_json(client, f"{stack.prom_url}/api/v1/alerts")
    assert {a["labels"].get("job") for a in data["alerts"] if a["labels"]["alertname"] == "OmaServiceDown"} \
        == {"oma-inventory"}
    victim.start()  # back, for whatever runs after
    await poll(lambda: targets_up(stack), 60, "inventory scraped again", diagnostics=stack.logs)


async def test_compose_healthchecks_pass_on_running_services(stack: Stack):
    """The containers' healthcheck commands, run against this run's processes."""
    for svc in compose_services().values():
        name = oma_service_of(svc)
        if not name:
            continue
        test = svc["healthcheck"]["test"]
        assert test[0] == "CMD" and test[1] == "python", test
        argv = [sys.executable, *test[2:]]
        port = stack.procs[name].port
        if name == "gateway":
            argv = [a.replace("127.0.0.1:8082", f"127.0.0.1:{port}") for a in argv]
        env = {**os.environ, "OMA_METRICS_PORT": str(port)}
        r = await asyncio.to_thread(subprocess.run, argv, env=env, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, (name, r.stderr[-1000:])
        if name != "gateway":  # a port where no OMA service runs is unhealthy
            env["OMA_METRICS_PORT"] = str(stack.prom_url.rsplit(":", 1)[1])
            r = await asyncio.to_thread(subprocess.run, argv, env=env, capture_output=True, timeout=30)
            assert r.returncode != 0, name


# ---------------------------------------------------------------------------------------------
# NATS users and permissions


def test_nats_conf_has_a_user_per_client():
    users = conf_users()
    assert set(users) == set(NATS_USERS)
    assert set(users.values()) == {f"NATS_PASSWORD_{u.upper()}" for u in NATS_USERS}
    clean = {k: v for k, v in os.environ.items() if not k.startswith("NATS_PASSWORD_")}
    test = [find_binary(), "-c", str(NATS_CONF), "-t"]
    r = subprocess.run(test, check=False, capture_output=True, text=True, env=clean)
    assert r.returncode != 0 and "NATS_PASSWORD_" in r.stderr + r.stdout, "an unset password must stop the server"
    # The example passwords (the shape operators copy) parse.
    example = env_file(ROOT / ".env.example")
    r = subprocess.run(test, check=False, capture_output=True, text=True,
                       env={**clean, **{var: example[var] for var in users.values()}})
    assert r.returncode == 0, r.stderr


async def test_real_services_work_on_the_secured_bus(stack: Stack):
    async with httpx.AsyncClient(base_url=stack.gateway) as client:
        body = await poll(lambda: gateway_healthy(stack, client), 60, "gateway healthy", diagnostics=stack.logs)
        assert all(s["status"] == "up" and s["instances"] == 1 for s in body["services"].values()), body
        r = await client.post("/api/v1/auth/login", json={"appliance_id": "test-vma", "token": SEED_TOKEN,
                                                          "version": "1.0.0"})
        assert r.status_code == 200, r.text
        auth = {"Authorization": f"Bearer {r.json()['session_token']}"}
        r = await client.get("/api/v1/vm-contexts", headers=auth)
        assert r.status_code == 200, r.text
        r = await client.post("/api/v1/auth/logout", headers=auth)
        assert r.status_code == 200, r.text
        # auth published the revocation on JetStream with its own user, and the gateway heard it.
        r = await client.get("/api/v1/vm-contexts", headers=auth)
        assert r.status_code == 401, r.text
        metrics = (await client.get(f"http://127.0.0.1:{stack.procs['auth'].port}/metrics")).text
    assert 'oma_events_published_total{subject="oma.evt.auth.session.revoked"} 1.0' in metrics


async def reported(seen: list[str], what: str) -> list[str]:
    """The errors the server sent on a connection (error_cb), once there is one."""
    return await poll(lambda: asyncio.sleep(0, seen), 5, what, 0.05)


async def denied(stack: Stack, user: str, subject: str) -> None:
    seen: list[str] = []
    nc = await stack.nats.connect(user, seen)
    try:
        with pytest.raises(errors.UpstreamTimeout):
            await Bus(nc).request(subject, {}, timeout=1.0)
        await reported(seen, f"a permission error for {user} on {subject}")
        assert any("permissions violation" in e.lower() and subject in e for e in seen), seen
    finally:
        await nc.close()


async def answered(stack: Stack, user: str, subject: str, payload: Any = None) -> None:
    """The real service answers (an error reply is an answer; a timeout is not)."""
    nc = await stack.nats.connect(user)
    try:
        try:
            await Bus(nc).request(subject, payload or {}, timeout=5.0)
        except errors.OmaError as exc:
            assert exc.status not in (errors.UpstreamTimeout.status, errors.Unavailable.status), exc
    finally:
        await nc.close()


async def test_only_the_gateway_calls_public_subjects(stack: Stack):
    await answered(stack, "gateway", Config.ACTION, {"action": "list"})
    await answered(stack, "gateway", health("config"))
    await denied(stack, "inventory", Config.ACTION)
    await denied(stack, "replication", Contexts.LIST)
    await denied(stack, "admin", Config.ACTION)
    await answered(stack, "admin", Contexts.REBUILD)


async def test_only_replication_gets_cloud_credentials_and_exports(stack: Stack):
    await answered(stack, "replication", Config.CREDENTIALS, {"id": 1})
    for user in ("inventory", "gateway", "export_manager", "context_aggregator", "auth"):
        await denied(stack, user, Config.CREDENTIALS)
    # replication's other calls: the exports of its jobs.
    await answered(stack, "replication", Exports.DEACTIVATE, {})
    await denied(stack, "inventory", Exports.ENSURE)
    # and the inventory listing that checks a request's vcenter_host (services/replication/original.py).
    await answered(stack, "replication", Inventory.LIST, {})
    await denied(stack, "replication", Inventory.DISCOVER)
    # failover acts in the cloud too, releases and restores exports, and powers the source through inventory.
    await answered(stack, "failover", Config.CREDENTIALS, {"id": 1})
    await answered(stack, "failover", Exports.DEACTIVATE, {})
    await answered(stack, "failover", Inventory.POWER, {})
    for user in ("replication", "gateway", "export_manager", "context_aggregator"):
        await denied(stack, user, Inventory.POWER)


async def test_services_cannot_listen_or_speak_for_others(stack: Stack):
    for user, subject in (("inventory", "oma.config.>"), ("export_manager", "oma.replication.>"),
                          ("inventory", "_INBOX_replication.>"), ("gateway", "_INBOX.>")):
        seen: list[str] = []
        nc = await stack.nats.connect(user, seen)
        try:
            await nc.subscribe(subject)
            await nc.flush()
            await reported(seen, f"{user} refused {subject}")
            assert any("permissions violation" in e.lower() and "subscription" in e.lower() for e in seen), seen
        finally:
            await nc.close()
    # An event in another service's name is refused; the own service's is accepted.
    seen = []
    nc = await stack.nats.connect("inventory", seen)
    try:
        await nc.publish(Config.EVT_CHANGED, b"{}")
        await nc.publish("oma.evt.inventory.test.probed", b"{}")
        await nc.flush()
        await reported(seen, "a refused event")
        await asyncio.sleep(0.2)
        assert len(seen) == 1 and Config.EVT_CHANGED in seen[0], seen
    finally:
        await nc.close()


# ---------------------------------------------------------------------------------------------
# compose.yaml and .env.example


def compose_services() -> dict[str, dict[str, Any]]:
    return load_compose()["services"]


def test_compose_matches_the_compose_specification():
    assert COMPOSE_SCHEMA.is_file(), "apt-get install docker-compose (ships the Compose Specification schema)"
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    validator = jsonschema.Draft201909Validator(schema)
    problems = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(load_compose())]
    assert not problems, problems
    # The schema is strict, so a typo would have been caught.
    broken = load_compose()
    broken["services"]["auth"]["helthcheck"] = broken["services"]["auth"].pop("healthcheck")
    assert not validator.is_valid(broken)


def test_docker_compose_config_accepts_it_with_the_example_env(tmp_path: Path):
    dc = shutil.which("docker-compose")
    assert dc, "apt-get install docker-compose"
    base = [dc, "--project-directory", str(ROOT), "-f", str(ROOT / "compose.yaml")]
    r = subprocess.run([*base, "--env-file", str(ROOT / ".env.example"), "config"], check=False, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    resolved = yaml.safe_load(r.stdout)
    assert resolved["services"]["auth"]["environment"]["OMA_NATS_PASSWORD"] == "changemenatsauth"
    # Without the secrets, compose refuses to start rather than run with empty passwords.
    empty = tmp_path / "empty.env"
    empty.write_text("")
    r = subprocess.run([*base, "--env-file", str(empty), "config", "-q"], check=False, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0 and "in .env" in r.stderr, r.stderr


def test_compose_services_healthchecks_and_dependencies():
    services = compose_services()
    by_oma = {oma_service_of(s): name for name, s in services.items() if oma_service_of(s)}
    assert set(by_oma) == {*SERVICES, "gateway"}, "one container per OMA service"
    assert {"nats", "mariadb", "prometheus", "grafana"} <= set(services)
    for name, svc in services.items():
        hc = svc.get("healthcheck")
        assert hc and hc.get("test") and not hc.get("disable"), f"{name} has no healthcheck"
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in services, (name, dep)
            assert cond == {"condition": "service_healthy"}, (name, dep, cond)
    for oma, name in by_oma.items():
        deps = set(services[name]["depends_on"])
        assert "nats" in deps, name
        if oma == "gateway":
            assert deps >= {by_oma[s] for s in SERVICES}
        else:
            assert "mariadb" in deps, name
            env = services[name]["environment"]
            assert env["OMA_METRICS_PORT"] == str(METRICS_PORTS[oma]), name
            # The healthcheck reads the metrics port it is given.
            assert "OMA_METRICS_PORT" in " ".join(services[name]["healthcheck"]["test"])
    assert services[by_oma["gateway"]]["environment"]["OMA_PORT"] == "8082"
    assert any("/health" in part for part in services[by_oma["gateway"]]["healthcheck"]["test"])


def test_compose_export_manager_reaches_block_devices():
    svc = compose_services()["export-manager"]
    assert oma_service_of(svc) == "export_manager"
    assert svc.get("privileged") is True or svc.get("devices")
    binds = [v.split(":")[:2] for v in svc["volumes"] if v.startswith("/")]
    assert any(src in ("/dev", "/dev/disk/by-id") and dst == src for src, dst in binds), binds
    assert svc["environment"]["OMA_DEVICE_BY_ID_DIR"] == "/dev/disk/by-id"
    assert svc["environment"]["OMA_NBD_LISTEN_ADDR"] == "0.0.0.0"
    assert "10809:10809" in svc["ports"]
    assert svc.get("init") is True  # reaps the daemonized NBD server's orphans


def test_compose_environment_is_settings_and_secrets_come_from_env():
    services = compose_services()
    users = conf_users()
    for name, svc in services.items():
        env = svc.get("environment") or {}
        assert isinstance(env, dict), name
        unknown = {k for k in env if k.startswith("OMA_")} - SETTINGS_ENV
        assert not unknown, f"{name}: not settings fields: {unknown}"
        oma = oma_service_of(svc)
        if oma:
            user = env["OMA_NATS_USER"]
            assert user == oma
            assert env["OMA_NATS_PASSWORD"].startswith(f"${{{users[user]}:?"), (name, env["OMA_NATS_PASSWORD"])
            assert env["OMA_NATS_URL"] == "nats://nats:4222"
    nats_env = services["nats"]["environment"]
    assert {k: v.split(":?")[0] for k, v in nats_env.items()} == {v: f"${{{v}" for v in users.values()}
    # No literal secret anywhere: every password-like value is a ${VAR} from .env.
    text = "\n".join(line for line in (ROOT / "compose.yaml").read_text().splitlines()
                     if not line.lstrip().startswith("#"))
    for key, value in re.findall(r"^\s*([A-Z_]*(?:PASS|PASSWORD)[A-Z_]*):\s*(\S+)", text, re.MULTILINE):
        assert value.startswith("${") and ":?" in value, (key, value)
    # Every variable compose interpolates is in .env.example; its OMA_ names are settings.
    example = env_file(ROOT / ".env.example")
    used = set(re.findall(r"\$\{(\w+)", text))
    assert used <= set(example), used - set(example)
    assert {k for k in example if k.startswith("OMA_")} <= SETTINGS_ENV


def test_env_is_ignored_and_the_example_is_not():
    r = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=ROOT, check=False)
    assert r.returncode == 0, ".env must be git-ignored"
    r = subprocess.run(["git", "check-ignore", "-q", ".env.example"], cwd=ROOT, check=False)
    assert r.returncode == 1, ".env.example must be committed"


def test_compose_mounts_the_project_files():
    services = compose_services()
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("./"):
                assert (ROOT / src).exists(), (name, src)
    assert "./ops/nats/nats-server.conf:/etc/nats/nats-server.conf:ro" in services["nats"]["volumes"]
    assert services["nats"]["command"] == ["-c", "/etc/nats/nats-server.conf"]
    assert any(v.startswith("./ops/prometheus:/etc/prometheus") for v in services["prometheus"]["volumes"])
    grafana = {v.split(":")[0]: v.split(":")[1] for v in services["grafana"]["volumes"]}
    assert grafana["./ops/grafana/provisioning"] == "/etc/grafana/provisioning"
    provider = yaml.safe_load((GRAFANA_DIR / "provisioning/dashboards/oma.yml").read_text())["providers"][0]
    assert grafana["./ops/grafana/dashboards"] == provider["options"]["path"]
    datasource = yaml.safe_load((GRAFANA_DIR / "provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090" and "prometheus" in services


def test_dashboards_are_provisionable():
    ds = yaml.safe_load((GRAFANA_DIR / "provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    titles = {}
    for path in (GRAFANA_DIR / "dashboards").glob("*.json"):
        board = json.loads(path.read_text())
        titles[board["title"]] = board["uid"]
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), path.name
        for panel in board["panels"]:
            if panel["type"] == "row":
                continue
            assert panel["datasource"]["uid"] == ds["uid"], (path.name, panel["title"])
            assert panel["targets"], (path.name, panel["title"])
    assert set(titles) == {"OMA overview", "OMA job detail"}
    assert len(set(titles.values())) == 2
    overview = json.loads((GRAFANA_DIR / "dashboards/oma-overview.json").read_text())
    panel_titles = " | ".join(p["title"].lower() for p in overview["panels"])
    for topic in ("by route", "subject and status", "jobs by status", "throughput", "exports active", "reloads"):
        assert topic in panel_titles, topic


# ---------------------------------------------------------------------------------------------
# The image


def dockerfile() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def docker_context_excluded(rel: str, patterns: list[str]) -> bool:
    """.dockerignore as Docker reads it (for the patterns used here): a pattern matches a path or
    one of its parents, `**/` any depth; the last match wins, `!` re-includes."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for raw in patterns:
        pat = raw.lstrip("!").rstrip("/")
        if pat.startswith("**/"):
            hit = any(fnmatch.fnmatch(part, pat[3:]) for part in parts)
        else:
            hit = any(fnmatch.fnmatch(prefix, pat) for prefix in prefixes)
        if hit:
            excluded = not raw.startswith("!")
    return excluded


def test_image_installs_the_project_and_the_exporters(tmp_path: Path):
    steps = dockerfile()
    assert steps[0] == ("FROM", "python:3.11-slim")
    runs = " ".join(arg for op, arg in steps if op == "RUN")
    for pkg in ("nbdkit", "nbd-server", "libnbd-bin"):
        assert re.search(rf"apt-get install[^&]*\b{re.escape(pkg)}\b", runs), pkg
    assert re.search(r"pip install \.(\s|$)", runs)
    cmd = json.loads(next(arg for op, arg in steps if op == "CMD"))
    assert cmd[0] in project_scripts()
    for svc in compose_services().values():
        if "build" in svc:
            assert svc["command"][0] in project_scripts()

    # Build the wheel from exactly what the Dockerfile copies, minus what .dockerignore drops.
    ignore = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
              if p.strip() and not p.startswith("#")]
    src = tmp_path / "src"
    for op, arg in steps:
        if op != "COPY":
            continue
        *sources, dest = arg.split()
        for s in sources:
            assert (ROOT / s).exists(), f"COPY {s}: not in the repository"
            assert not docker_context_excluded(s, ignore), f"COPY {s}: excluded by .dockerignore"
            target = src / (s if dest in ("./", ".") else dest.removeprefix("./").rstrip("/"))
            if (ROOT / s).is_dir():
                shutil.copytree(ROOT / s, target, ignore=lambda d, names: [
                    n for n in names if docker_context_excluded(
                        str((Path(d) / n).relative_to(ROOT)), ignore)])
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / s, target)
    # What `pip install .` installs: setuptools' build of the packages and the egg metadata (the
    # same package discovery and package-data as the wheel; no network, no `wheel` package needed).
    r = subprocess.run([sys.executable, "setup.py", "-q",
                        "egg_info", "--egg-base", str(tmp_path), "build", "--build-base", str(tmp_path / "build")],
                       cwd=src, check=False, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lib = tmp_path / "build" / "lib"
    names = {str(p.relative_to(lib)) for p in lib.rglob("*") if p.is_file()}
    entry_points = (tmp_path / "oma.egg-info" / "entry_points.txt").read_text()
    assert "oma-service = oma.cli:oma_service" in entry_points
    # One top-level package: the repository's services/, shared/ and plugins/ sit under oma/.
    assert {n.split("/")[0] for n in names} == {"oma"}, sorted({n.split("/")[0] for n in names})
    for service in (*SERVICES, "gateway"):
        assert f"oma/services/{service}/app.py" in names, service
    for migration in [*ROOT.glob("services/*/migrations/versions/*.py"), *ROOT.glob("services/*/migrations/env.py")]:
        assert f"oma/{migration.relative_to(ROOT)}" in names, f"the image would lack {migration}"


# ---------------------------------------------------------------------------------------------
# systemd


def test_systemd_units_verify(tmp_path: Path):
    assert shutil.which("systemd-analyze"), "systemd-analyze (package systemd) is needed"
    units = tmp_path / "units"
    shutil.copytree(SYSTEMD_DIR, units)
    bindir = str(Path(console_script("oma-api")).parent)
    for path in units.rglob("*"):
        if path.suffix in (".service", ".conf", ".target"):
            path.write_text(path.read_text().replace(INSTALL_BIN, bindir))
    names = ["oma-api.service", "oma.target", *(f"oma-service@{n}.service" for n in (*SERVICES, "gateway"))]
    for name in names:
        r = subprocess.run(["systemd-analyze", "verify", name], cwd=units, check=False, capture_output=True, text=True,
                           env={**os.environ, "SYSTEMD_UNIT_PATH": f"{units}:"}, timeout=60)
        assert r.returncode == 0 and not r.stderr.strip(), (name, r.stdout, r.stderr)


LIST_KEYS = {"ExecStart", "StateDirectory", "EnvironmentFile", "Environment"}


def apply_unit(path: Path, into: dict[str, dict[str, list[str]]]) -> dict[str, dict[str, list[str]]]:
    """Read a unit file or drop-in over `into` as systemd does: an empty assignment resets,
    list settings accumulate, others are replaced."""
    section = ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            into.setdefault(section, {})
            continue
        key, _, value = (part.strip() for part in line.partition("="))
        current = into[section].setdefault(key, [])
        if not value:
            current.clear()
        elif key in LIST_KEYS:
            current.append(value)
        else:
            into[section][key] = [value]
    return into


def effective(name: str) -> dict[str, list[str]]:
    """[Service] of a unit with its drop-ins applied (the template for an instance)."""
    base = SYSTEMD_DIR / name
    if not base.exists():
        base = SYSTEMD_DIR / re.sub(r"@[^.]+\.", "@.", name)
    sections = apply_unit(base, {})
    for dropin in sorted((SYSTEMD_DIR / f"{name}.d").glob("*.conf")):
        apply_unit(dropin, sections)
    return sections["Service"]


def test_systemd_units_run_the_console_scripts():
    scripts = project_scripts()
    api = effective("oma-api.service")
    argv = api["ExecStart"][0].split()
    assert argv[0] == f"{INSTALL_BIN}/oma-api" and argv[1:5] == ["-port", "8082", "-db-type", "mariadb"]
    assert "-db-pass" not in argv, "the password belongs in the EnvironmentFile"
    assert api["EnvironmentFile"] == ["/etc/oma/oma.env"]
    for name in ("oma-api.service", *(f"oma-service@{n}.service" for n in (*SERVICES, "gateway"))):
        svc = effective(name)
        assert len(svc["ExecStart"]) == 1, name
        exe = svc["ExecStart"][0].split()[0]
        assert exe.startswith(INSTALL_BIN + "/") and exe.rsplit("/", 1)[1] in scripts, (name, exe)
        assert svc["Restart"] == ["on-failure"], name
        assert any(f.lstrip("-") == "/etc/oma/oma.env" for f in svc["EnvironmentFile"]), name
        for assignment in svc.get("Environment", []):
            key = assignment.split("=", 1)[0]
            assert not key.startswith("OMA_") or key in SETTINGS_ENV, (name, key)
    em = effective("oma-service@export_manager.service")
    assert em["KillMode"] == ["process"]
    assert em["User"] == ["root"]
    assert em["ExecStart"][0].split()[1] == "export_manager"
    assert effective("oma-service@config.service").get("KillMode", ["control-group"]) == ["control-group"]
    assert effective("oma-api.service")["KillMode"] == ["process"]  # it runs export_manager too
    # ...and the service itself leaves the NBD server running when it stops.
    for name in ("oma-api.service", "oma-service@export_manager.service"):
        assert "OMA_NBD_KEEP_RUNNING=true" in effective(name)["Environment"], name
    dropin = (SYSTEMD_DIR / "oma-service@export_manager.service.d").glob("*.conf")
    assert any("KillMode=process" in p.read_text() and "#" in p.read_text() for p in dropin)
    example = env_file(SYSTEMD_DIR / "oma.env.example")
    assert set(example) <= SETTINGS_ENV, set(example) - SETTINGS_ENV
