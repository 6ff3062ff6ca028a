"""Contract tests of the NBD exporter plugins against real nbdkit and nbd-server processes.

File-backed devices (sparse files in tmp dirs), free loopback ports. A missing nbd-server,
nbdkit, nbdinfo or nbdcopy makes these tests FAIL, never skip.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from nbdutil import MiB, digest, free_port, missing_tools, nbdcopy, random_file, sparse_file, wait_until
from oma.plugins.nbd import (Exporter, ExporterConfig, ExporterStartError, ExportCheckError, NbdkitExporter,
                         NbdServerExporter, probe)
from oma.plugins.nbd import nbdserver
from oma.plugins.nbd.base import parse_version
from oma.plugins.nbd.plugin import oma_register_exporters
from oma.shared.errors import BadGateway, BadRequest, NotFound
from oma.shared.settings import Settings, variables

BACKENDS = {"nbdkit": NbdkitExporter, "nbd-server": NbdServerExporter}
# reloads one batch of additions costs, per backend
RELOADS_PER_BATCH = {"nbdkit": 0, "nbd-server": 1}


@pytest.fixture(scope="session", autouse=True)
def nbd_tools_installed():
    missing = missing_tools()
    if missing:
        pytest.fail(f"required NBD tools are not installed: {', '.join(missing)} "
                    "(apt-get install nbd-server nbdkit libnbd-bin)")


def make_config(tmp_path, **kw) -> ExporterConfig:
    kw.setdefault("watchdog_interval", 0.2)
    return ExporterConfig(port=free_port(), state_dir=tmp_path / "state", **kw)


@pytest.fixture(params=list(BACKENDS))
async def exporter(request, tmp_path):
    exp = BACKENDS[request.param](make_config(tmp_path))
    await exp.start()
    try:
        yield exp
    finally:
        await exp.stop()


async def test_start_state_and_protocol(exporter):
    assert isinstance(exporter, Exporter)
    st = exporter.state()
    assert st["running"] and st["pid"] and st["port"] == exporter.port
    assert st["backend"] == exporter.name and st["host"] == "127.0.0.1"
    assert st["reloads"] == 0 and st["restarts"] == 0 and st["version"]
    assert await probe.handshake("127.0.0.1", exporter.port)


async def test_write_64mib_through_export(exporter, tmp_path):
    dev = sparse_file(tmp_path / "disk0.img", 128 * MiB)
    assert await exporter.add_export("vm-1-disk0", str(dev)) is True
    assert exporter.list_exports() == {"vm-1-disk0": str(dev)}
    assert await exporter.check_export("vm-1-disk0") == 128 * MiB
    info = await probe.export_info(exporter.uri("vm-1-disk0"))
    assert info["can_flush"] is True and info["can_fua"] is True

    src = random_file(tmp_path / "src.bin", 64 * MiB)
    await nbdcopy(src, exporter.uri("vm-1-disk0"), "--flush")
    assert digest(dev, 64 * MiB) == digest(src)
    assert os.path.getsize(dev) == 128 * MiB


async def test_reuse_costs_no_reload(exporter, tmp_path):
    dev = sparse_file(tmp_path / "d.img", 4 * MiB)
    assert await exporter.add_export("reuse", str(dev)) is True
    reloads = exporter.reloads
    assert await exporter.add_export("reuse", str(dev)) is False
    assert exporter.reloads == reloads
    assert await exporter.check_export("reuse") == 4 * MiB


async def test_concurrent_reuse_waits_for_the_reload(exporter, tmp_path):
    """Two callers ensure the same export at once: one creates it, the other reuses it, and
    neither returns before the export is served."""
    dev = sparse_file(tmp_path / "same.img", 2 * MiB)

    async def ensure():
        changed = await exporter.add_export("same", str(dev))
        return changed, await exporter.check_export("same")
    results = await asyncio.gather(ensure(), ensure(), ensure())
    assert sorted(results) == [(False, 2 * MiB), (False, 2 * MiB), (True, 2 * MiB)]
    assert exporter.reloads == RELOADS_PER_BATCH[exporter.name]


async def test_concurrent_adds_share_one_reload(exporter, tmp_path):
    devs = [sparse_file(tmp_path / f"c{i}.img", (i + 1) * MiB) for i in range(20)]
    before = exporter.reloads
    results = await asyncio.gather(*(exporter.add_export(f"c{i}", str(d)) for i, d in enumerate(devs)))
    assert results == [True] * 20
    assert exporter.reloads - before == RELOADS_PER_BATCH[exporter.name]
    sizes = await asyncio.gather(*(exporter.check_export(f"c{i}") for i in range(20)))
    assert sizes == [(i + 1) * MiB for i in range(20)]
    names = await probe.list_export_names("127.0.0.1", exporter.port)
    assert {f"c{i}" for i in range(20)} <= set(names)

    # removing a batch concurrently costs one reload as well
    before = exporter.reloads
    assert await asyncio.gather(*(exporter.remove_export(f"c{i}") for i in range(10))) == [True] * 10
    assert exporter.reloads - before == RELOADS_PER_BATCH[exporter.name]
    assert sorted(exporter.list_exports()) == sorted(f"c{i}" for i in range(10, 20))


async def test_open_connection_keeps_writing_while_export_added(exporter, tmp_path):
    """A client streams through its connection (stdin pipe, so it is provably mid-copy) while
    another export is added; on nbd-server that add restarts the main process."""
    dev = sparse_file(tmp_path / "busy.img", 256 * MiB)
    await exporter.add_export("busy", str(dev))
    src = random_file(tmp_path / "stream.bin", 160 * MiB)
    data = src.read_bytes()
    proc = await asyncio.create_subprocess_exec("nbdcopy", "--flush", "-", exporter.uri("busy"),
                                                stdin=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    half = 80 * MiB
    proc.stdin.write(data[:half])
    await proc.stdin.drain()

    before = exporter.reloads
    other = sparse_file(tmp_path / "other.img", 8 * MiB)
    assert await exporter.add_export("other", str(other)) is True
    assert exporter.reloads - before == RELOADS_PER_BATCH[exporter.name]
    assert proc.returncode is None, "the copy must still be running across the reload"
    assert await exporter.check_export("other") == 8 * MiB

    proc.stdin.write(data[half:])
    await proc.stdin.drain()
    proc.stdin.close()
    _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert digest(dev, len(data)) == digest(src)


async def test_watchdog_restarts_killed_server(exporter, tmp_path):
    dev = sparse_file(tmp_path / "w.img", 2 * MiB)
    await exporter.add_export("w", str(dev))
    old = exporter.pid
    os.kill(old, signal.SIGKILL)
    await wait_until(lambda: exporter.restarts == 1, timeout=10, what="watchdog restart")
    assert exporter.pid != old and exporter.state()["running"]
    assert await exporter.check_export("w") == 2 * MiB


async def test_repoint_export(exporter, tmp_path):
    a = sparse_file(tmp_path / "a.img", 1 * MiB)
    b = sparse_file(tmp_path / "b.img", 3 * MiB)
    await exporter.add_export("rp", str(a))
    assert await exporter.check_export("rp") == 1 * MiB
    before = exporter.reloads
    assert await exporter.add_export("rp", str(b)) is True
    assert exporter.reloads - before == RELOADS_PER_BATCH[exporter.name]
    assert exporter.list_exports()["rp"] == str(b)
    assert await exporter.check_export("rp") == 3 * MiB


async def test_remove_export(exporter, tmp_path):
    dev = sparse_file(tmp_path / "r.img", 1 * MiB)
    keep = sparse_file(tmp_path / "k.img", 1 * MiB)
    await asyncio.gather(exporter.add_export("gone", str(dev)), exporter.add_export("kept", str(keep)))
    assert await exporter.remove_export("gone") is True
    assert await exporter.remove_export("gone") is False
    assert "gone" not in exporter.list_exports()
    with pytest.raises(ExportCheckError) as exc:
        await exporter.check_export("gone")
    assert "no export named" in str(exc.value)
    assert isinstance(exc.value, BadGateway) and exc.value.status == 502
    assert await exporter.check_export("kept") == 1 * MiB


async def test_validation(exporter, tmp_path):
    dev = sparse_file(tmp_path / "v.img", MiB)
    for bad in ["", "a/b", "../x", ".hidden", "_placeholder", "a b", "x" * 201, "é"]:
        with pytest.raises(BadRequest):
            await exporter.add_export(bad, str(dev))
    with pytest.raises(BadRequest):
        await exporter.add_export("ok", "relative/path.img")
    with pytest.raises(NotFound):
        await exporter.add_export("ok", str(tmp_path / "missing.img"))
    assert exporter.list_exports() == {}
    assert exporter.reloads == 0


async def test_attach_to_running_server(exporter, tmp_path):
    """stop(keep_running=True) leaves the server up; a new exporter attaches through the pid
    file, and serves an export added while nobody supervised the server."""
    d1 = sparse_file(tmp_path / "at1.img", MiB)
    d2 = sparse_file(tmp_path / "at2.img", 2 * MiB)
    await exporter.add_export("at1", str(d1))
    pid = exporter.pid
    await exporter.stop(keep_running=True)

    again = type(exporter)(exporter.config)
    await asyncio.sleep(0.05)
    assert await again.add_export("at2", str(d2)) is True     # not started: written, applied at start
    await again.start()
    try:
        assert again.attached or exporter.name == "nbd-server"  # nbd-server restarts for the newer conf.d
        if exporter.name == "nbdkit":
            assert again.pid == pid
        assert again.list_exports() == {"at1": str(d1), "at2": str(d2)}
        assert await again.check_export("at1") == MiB
        assert await again.check_export("at2") == 2 * MiB
    finally:
        await again.stop()
    assert not again.state()["running"]


@pytest.mark.parametrize("backend", list(BACKENDS))
async def test_port_in_use_fails_clearly(backend, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        exp = BACKENDS[backend](ExporterConfig(port=port, state_dir=tmp_path / "state"))
        with pytest.raises(ExporterStartError) as exc:
            await exp.start()
        assert "already in use" in str(exc.value) and str(port) in str(exc.value)
        assert not exp.state()["running"]
        await exp.stop()


def _dpkg_version(pkg: str) -> tuple[int, ...]:
    out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True, check=True)
    return parse_version(out.stdout)


@pytest.mark.parametrize("backend,pkg", [("nbdkit", "nbdkit"), ("nbd-server", "nbd-server")])
async def test_version_detection(backend, pkg, tmp_path):
    exp = BACKENDS[backend](make_config(tmp_path))
    version = await exp.detect_version()
    assert version[:2] == _dpkg_version(pkg)[:2]
    if backend == "nbd-server":
        assert exp.state()["reload_mode"] == nbdserver.reload_mode(version, {"add"})


def test_parse_version_and_reload_mode():
    assert parse_version("This is nbd-server version 3.24") == (3, 24)
    assert parse_version("1:3.24-1.1") == (3, 24)
    assert parse_version("nbdkit 1.32.5") == (1, 32, 5)
    assert nbdserver.reload_mode((3, 24), {"add"}) == "restart"
    assert nbdserver.reload_mode((3, 25), {"add"}) == "sighup"
    assert nbdserver.reload_mode((3, 26, 1), {"add", "change"}) == "restart"   # SIGHUP ignores changes
    assert nbdserver.reload_mode((3, 26, 1), {"change"}) == "restart"


def test_base_config_template_matches_fallback(tmp_path):
    exp = NbdServerExporter(make_config(tmp_path))
    assert nbdserver.TEMPLATE_PATH.exists()

    def settings(text: str) -> list[str]:
        return [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    from_file = exp.render_config()
    exp.config.base_config = tmp_path / "fallback.conf"
    exp.config.base_config.write_text(nbdserver.FALLBACK_TEMPLATE)
    assert settings(from_file) == settings(exp.render_config())
    assert "allowlist = true" in from_file and f"port = {exp.port}" in from_file


def test_plugin_registers_both_backends(tmp_path):
    registered = {}

    def register(name, factory, description=""):
        registered[name] = (factory, description)
    oma_register_exporters(register)
    assert set(registered) == {"nbdkit", "nbd-server"}
    settings = Settings(nbd_port=12345, nbd_listen_addr="127.0.0.2", data_dir=tmp_path, nbd_group="disk",
                        nbd_watchdog_interval=0.5)
    for name, (factory, description) in registered.items():
        exp = factory(settings)
        assert description
        assert isinstance(exp, Exporter) and exp.name == name
        assert (exp.port, exp.host) == (12345, "127.0.0.2")
        assert exp.config.state_dir == tmp_path / "exports"
        assert (exp.config.group, exp.config.watchdog_interval, exp.config.tls) == ("disk", 0.5, False)
    default = registered["nbdkit"][0](Settings(data_dir=tmp_path))
    assert (default.port, default.host) == (10809, "127.0.0.1")


def test_every_nbd_env_variable_reaches_the_exporter(tmp_path, monkeypatch):
    """OMA_NBD_* are Settings fields: OMA_NBD_GROUP=disk is no longer silently ignored, an unknown
    one is refused, and nbd-server's rendered config carries user and group."""
    env = {"OMA_NBD_GROUP": "disk", "OMA_NBD_USER": "nbd", "OMA_NBD_WATCHDOG_INTERVAL": "2.5",
           "OMA_NBD_RELOAD_DEBOUNCE": "0.2", "OMA_NBD_BINARY": "/usr/sbin/nbd-server",
           "OMA_NBD_ATTACH_PIDFILE": str(tmp_path / "x.pid"), "OMA_NBD_BASE_CONFIG": str(tmp_path / "b.conf"),
           "OMA_NBD_TLS": "true", "OMA_NBD_TLS_USERNAME": "vma", "OMA_NBD_TLS_CLIENT_PSK_FILE": "/etc/vma/k.psk",
           "OMA_DATA_DIR": str(tmp_path)}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    cfg = ExporterConfig.from_settings(Settings())
    assert (cfg.group, cfg.user, cfg.watchdog_interval, cfg.reload_debounce) == ("disk", "nbd", 2.5, 0.2)
    assert (cfg.binary, cfg.attach_pidfile, cfg.base_config) == ("/usr/sbin/nbd-server", tmp_path / "x.pid",
                                                                 tmp_path / "b.conf")
    assert (cfg.tls, cfg.tls_username, cfg.tls_client_psk_file) == (True, "vma", "/etc/vma/k.psk")
    assert cfg.tls_psk_file == tmp_path / "exports" / "nbd-tls.psk"
    monkeypatch.setenv("OMA_NBD_TLS", "false")
    monkeypatch.delenv("OMA_NBD_BASE_CONFIG")
    rendered = NbdServerExporter(ExporterConfig.from_settings(Settings())).render_config()
    assert "group = disk" in rendered and "user = nbd" in rendered


def test_docs_name_only_existing_nbd_settings():
    """Every nbd_* / OMA_NBD_* / export_* name in the exporter docs is a variable of the Settings tree,
    and every nbd_* one (the nbd plugin's section and the core's nbd_keep_running, nbd_host) is
    documented in docs/exporters.md."""
    docs = Path(__file__).resolve().parents[1] / "docs"
    fields = {v.name for v in variables()}
    exporters = (docs / "exporters.md").read_text()
    for page in ("exporters.md", "export-manager.md"):
        text = (docs / page).read_text()
        named = {m.lower() for m in re.findall(r"\bOMA_((?:NBD|EXPORT)_[A-Z_]+)", text)}
        for row in re.findall(r"^\| ([^|]+) \|", text, re.M):          # first cells of the settings tables
            named |= set(re.findall(r"`((?:nbd|export)_[a-z_]+)`", row))
        assert named and named <= fields, (page, named - fields)
    assert {f for f in fields if f.startswith("nbd_")} <= set(re.findall(r"`(nbd_[a-z_]+)`", exporters))


# Run in a child process: it lowers its own RLIMIT_NOFILE (a real resource limit) and may become the
# subreaper of the daemonized nbdkit, neither of which the test process should do to itself.
EMFILE_SCENARIO = r'''
import asyncio, ctypes, json, logging, os, resource, signal, sys
from oma.plugins.nbd import ExporterConfig, NbdkitExporter
from oma.plugins.nbd.base import pid_alive

records = []
class Keep(logging.Handler):
    def emit(self, record):
        records.append(record.getMessage())
logger = logging.getLogger("oma.nbd")
logger.addHandler(Keep())
logger.setLevel(logging.INFO)
port, state, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3]
# PR_SET_CHILD_SUBREAPER: the daemonized server becomes our child, so whether its pid is reaped
# ("reaped": gone) or stays a zombie ("zombie") is up to this script, not to PID 1.
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)

async def main():
    exp = NbdkitExporter(ExporterConfig(port=port, state_dir=state, watchdog_interval=0.05,
                                        watchdog_max_backoff=0.4))
    await exp.start()
    async with exp._lock:                       # the watchdog skips its rounds meanwhile
        pid = exp.pid
        os.kill(pid, signal.SIGKILL)
        if mode == "reaped":
            os.waitpid(pid, 0)
        while pid_alive(pid):                   # zombie mode: dead, but /proc must be read to know it
            await asyncio.sleep(0.01)
        fd = os.open("/dev/null", os.O_RDONLY)  # the lowest free descriptor number...
        os.close(fd)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (fd, hard))   # ...is now over the limit: EMFILE
        records.clear()
    await asyncio.sleep(2.0)
    out = {"limited": list(records), "failures": exp.watchdog_failures, "restarts": exp.restarts,
           "last_error": exp.last_error, "serving_error": await exp.serving_error()}
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    records.clear()
    for _ in range(200):
        if exp.restarts:
            break
        await asyncio.sleep(0.05)
    out.update(after=list(records), restarts_after=exp.restarts, serving_after=await exp.serving_error())
    await exp.stop()
    print(json.dumps(out))

asyncio.run(main())
'''


@pytest.mark.parametrize("mode", ["reaped", "zombie"])
def test_watchdog_tells_emfile_from_process_gone_and_backs_off(mode, tmp_path):
    """Out of file descriptors (a real RLIMIT_NOFILE), the watchdog says so: 'cannot spawn' when the
    server's pid is gone, 'cannot check' when it cannot even read /proc; it never reads EMFILE as a
    dead server, retries with a doubling delay (not every interval), and restarts the server once
    descriptors are available again."""
    proc = subprocess.run([sys.executable, "-c", EMFILE_SCENARIO, str(free_port()), str(tmp_path / "s"), mode],
                          capture_output=True, text=True, timeout=60, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    limited = "\n".join(out["limited"])
    if mode == "reaped":
        assert re.fullmatch(r"nbdkit \(pid \d+\) is gone; restarting it", out["limited"][0]), limited
        assert limited.count("is gone") == 1, limited
        assert "watchdog: cannot spawn: cannot spawn nbdkit: Too many open files (EMFILE)" in limited
        assert out["last_error"].startswith("cannot spawn:")
    else:
        assert "is gone" not in limited, "EMFILE must not be read as a dead server"
        assert "watchdog: cannot check the server: Too many open files (EMFILE)" in limited
        assert out["last_error"].startswith("cannot check the server:")
        assert any("is gone; restarting it" in line for line in out["after"]), out["after"]
    assert "restarted" not in limited and out["restarts"] == 0
    assert out["serving_error"] == out["last_error"]
    # 2 s at a 0.05 s interval would be ~40 tries; doubling up to 0.4 s gives about 7
    assert 3 <= out["failures"] <= 10, out["failures"]
    assert "next try in 0.4s" in limited
    assert out["restarts_after"] == 1 and out["serving_after"] is None
    assert any("restarted (pid" in line for line in out["after"]), out["after"]
