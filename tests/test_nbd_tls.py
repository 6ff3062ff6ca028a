"""TLS with a pre-shared key on the nbdkit exporter, against the real nbdkit, nbdinfo and nbdcopy:
with the key an export reads and writes; without it (plain NBD, or another key) it is refused."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import stat
import uuid

import pytest
from nbdutil import MiB, digest, free_port, missing_tools, nbdcopy, random_file, sparse_file

from oma.plugins.nbd import ExporterConfig, ExporterStartError, NbdkitExporter, NbdServerExporter, probe
from oma.services.export_manager import service as em
from oma.runner import Appliance
from oma.shared.subjects import Exports
from tests.test_replication import replication_env, request

PSK_LINE = re.compile(r"^oma:[0-9a-f]{64}\n$")


@pytest.fixture(scope="module", autouse=True)
def nbd_tools_installed():
    missing = missing_tools()
    if missing:
        pytest.fail(f"required NBD tools are not installed: {', '.join(missing)}")


async def nbdinfo(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec("nbdinfo", *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode, out.decode(errors="replace")


@contextlib.asynccontextmanager
async def tls_exporter(tmp_path, **kw):
    kw.setdefault("port", free_port())
    cfg = ExporterConfig(state_dir=tmp_path / "state", watchdog_interval=0.2, tls=True, **kw)
    exp = NbdkitExporter(cfg)
    await exp.start()
    try:
        yield exp
    finally:
        await exp.stop()


async def test_with_the_key_nbdinfo_reads_the_export_without_it_is_refused(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    dev = sparse_file(tmp_path / "vdc.img", 16 * MiB)
    async with tls_exporter(tmp_path) as exp:
        psk = exp.config.tls_psk_file
        assert psk == tmp_path / "state" / "nbd-tls.psk"
        assert stat.S_IMODE(psk.stat().st_mode) == 0o600
        text = psk.read_text()
        assert PSK_LINE.match(text), "psktool's format username:hexkey, a 256-bit key"
        key = text.strip().split(":", 1)[1]

        await exp.add_export("disk0", str(dev))
        uri = exp.uri("disk0")
        assert uri == f"nbds://oma@127.0.0.1:{exp.port}/disk0?tls-psk-file={psk}"
        rc, out = await nbdinfo("--size", uri)
        assert (rc, out.strip()) == (0, str(16 * MiB)), out
        assert await exp.check_export("disk0") == 16 * MiB

        # data written over TLS lands in the device
        src = random_file(tmp_path / "src.bin", 4 * MiB)
        await nbdcopy(src, uri, "--flush")
        assert digest(dev, 4 * MiB) == digest(src)

        # without the key: no export, not even a listing
        plain = probe.nbd_uri("127.0.0.1", exp.port, "disk0")
        rc, out = await nbdinfo("--size", plain)
        assert rc != 0 and "requires TLS" in out, out
        rc, out = await nbdinfo("--list", probe.nbd_uri("127.0.0.1", exp.port))
        assert rc != 0 and "disk0" not in out, out
        # with another key for the same identity: the TLS handshake fails
        wrong = tmp_path / "wrong.psk"
        wrong.write_text(f"oma:{'ab' * 32}\n")
        rc, out = await nbdinfo("--size", probe.nbd_uri("127.0.0.1", exp.port, "disk0", tls_username="oma",
                                                        psk_file=wrong))
        assert rc != 0 and "gnutls" in out.lower(), out
        with pytest.raises(probe.ExportCheckError):
            await probe.export_size(plain)

        # the key is in the file only: not in state, logs or the start log
        assert key not in repr(exp.state())
        assert key not in caplog.text
        assert key not in (exp.dir / "nbdkit.start.log").read_text()
        assert exp.state()["tls"] is True


async def test_psk_file_is_kept_across_restarts_and_checked(tmp_path):
    async with tls_exporter(tmp_path) as exp:
        first = exp.config.tls_psk_file.read_text()
    async with tls_exporter(tmp_path) as exp:
        assert exp.config.tls_psk_file.read_text() == first, "an existing key is reused, not replaced"

    for line, mode, refusal in ((f"oma:{'00' * 32}", 0o644, "readable by others"),
                                (f"someone:{'00' * 32}", 0o600, "no key for user 'oma'")):
        bad = tmp_path / f"bad-{mode:o}.psk"
        bad.write_text(line + "\n")
        bad.chmod(mode)
        with pytest.raises(ExporterStartError) as exc:
            async with tls_exporter(tmp_path, tls_psk_file=bad):
                pass
        assert refusal in str(exc.value.details)


async def test_tls_turned_on_replaces_a_plain_server_left_running(tmp_path):
    """nbd_keep_running leaves the server up across service restarts; turning TLS on must not
    attach to the old plain server."""
    dev = sparse_file(tmp_path / "k.img", MiB)
    cfg = ExporterConfig(port=free_port(), state_dir=tmp_path / "state", watchdog_interval=0)
    plain = NbdkitExporter(cfg)
    await plain.start()
    await plain.add_export("d0", str(dev))
    old_pid = plain.pid
    await plain.stop(keep_running=True)
    async with tls_exporter(tmp_path, port=cfg.port) as exp:
        assert not exp.attached and exp.pid != old_pid
        rc, out = await nbdinfo("--size", probe.nbd_uri("127.0.0.1", exp.port, "d0"))
        assert rc != 0 and "requires TLS" in out, out
        assert await exp.check_export("d0") == MiB
        await exp.stop(keep_running=True)
        again = NbdkitExporter(exp.config)      # same options: attaches, no restart
        await again.start()
        assert again.attached and again.pid == exp.pid
        await again.stop()


async def test_client_uri_names_the_vma_copy_and_nbd_server_refuses_tls(tmp_path):
    cfg = ExporterConfig(port=10809, state_dir=tmp_path, tls=True, tls_username="vma-01",
                         tls_client_psk_file="/etc/vma/oma nbd.psk")
    exp = NbdkitExporter(cfg)
    assert exp.uri("d0", client=True) == "nbds://vma-01@127.0.0.1:10809/d0?tls-psk-file=/etc/vma/oma%20nbd.psk"
    assert exp.uri("d0") == f"nbds://vma-01@127.0.0.1:10809/d0?tls-psk-file={tmp_path}/nbd-tls.psk"
    assert NbdkitExporter(ExporterConfig(port=10809, state_dir=tmp_path)).uri("d0") == "nbd://127.0.0.1:10809/d0"
    with pytest.raises(ExporterStartError) as exc:
        NbdServerExporter(cfg)
    assert "nbdkit backend only" in str(exc.value.details)


async def test_wildcard_listen_without_tls_warns(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="oma.nbd")
    exp = NbdkitExporter(ExporterConfig(port=free_port(), host="0.0.0.0", state_dir=tmp_path / "s",
                                        watchdog_interval=0))
    await exp.start()
    try:
        assert "without TLS" in caplog.text and "OMA_NBD_TLS=true" in caplog.text
    finally:
        await exp.stop()


async def test_export_manager_hands_out_the_tls_uri(make_settings, tmp_path):
    """Through the service: the ensure reply's `uri` opens the export with the key (as the VMA would)."""
    dev = sparse_file(tmp_path / "vdd.img", 8 * MiB)
    psk = tmp_path / "data" / "exports" / "nbd-tls.psk"
    settings = make_settings(export_backend="nbdkit", nbd_port=free_port(), data_dir=tmp_path / "data",
                             nbd_tls=True, nbd_tls_client_psk_file=str(psk))
    vm_id = str(uuid.uuid4())
    async with Appliance(settings, ("export_manager",)) as appliance:
        svc = appliance.services["export_manager"]
        r = await svc.bus.call(Exports.ENSURE, {"vm_id": vm_id, "disk_unit_number": 0, "vm_name": "tls-vm",
                                                "device_path": str(dev)})
        name = em.export_name_for(vm_id, 0)
        assert r["uri"] == f"nbds://oma@127.0.0.1:{settings.nbd.port}/{name}?tls-psk-file={psk}"
        src = random_file(tmp_path / "s.bin", 2 * MiB)
        await nbdcopy(src, r["uri"], "--flush")
        assert digest(dev, 2 * MiB) == digest(src)
        got = await svc.bus.call(Exports.GET, {"export_name": name, "check": True})
        assert got["connectable"] is True and got["uri"] == r["uri"]
        rc, out = await nbdinfo("--size", f"nbd://127.0.0.1:{settings.nbd.port}/{name}")
        assert rc != 0, out
        assert os.stat(psk).st_mode & 0o077 == 0


async def test_replication_hands_the_vma_an_nbds_uri_that_writes_into_the_volume(make_settings, tmp_path):
    """POST /api/v1/replications with TLS on: every nbd_exports entry carries the nbds:// URI (the
    VMA's PSK path), which opens with the key and lands in the cloud volume; a plain URI is refused."""
    vma_copy = tmp_path / "vma" / "oma-nbd.psk"
    async with replication_env(make_settings, tmp_path, nbd_tls=True, nbd_tls_client_psk_file=str(vma_copy)) as env:
        r = await env.post(request(env.config_id, "tls-vm", disks=2, size_gb=0.01))
        assert r.status_code == 201, r.text
        reply = r.json()
        server_psk = env.client.settings.data_dir / "exports" / "nbd-tls.psk"
        vma_copy.parent.mkdir()
        vma_copy.write_bytes(server_psk.read_bytes())          # the operator's out-of-band copy
        vma_copy.chmod(0o600)
        detail = await env.job(reply["job_id"])
        by_unit = {d["unit_number"]: d for d in detail["disks"]}
        assert [e["uri"] for e in detail["nbd_exports"]] == [e["uri"] for e in reply["nbd_exports"]]
        for exp in reply["nbd_exports"]:
            assert exp["uri"] == (f"nbds://oma@127.0.0.1:{exp['port']}/{exp['export_name']}"
                                  f"?tls-psk-file={vma_copy}")
            src = random_file(tmp_path / f"{exp['export_name']}.bin", MiB)
            await nbdcopy(src, exp["uri"], "--flush")
            volume_id = by_unit[exp["disk_unit_number"]]["volume_id"]
            assert digest(env.sim.backing_path(volume_id), MiB) == digest(src)
            rc, out = await nbdinfo("--size", probe.nbd_uri("127.0.0.1", exp["port"], exp["export_name"]))
            assert rc != 0 and "requires TLS" in out, out
