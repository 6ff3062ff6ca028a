"""Talk to an NBD server the way a client does: real connections, never exit codes.

- `handshake()` reads the server greeting and aborts politely: proof that an NBD server
  answers on host:port (used for readiness; no subprocess, a few milliseconds).
- `export_size()` runs `nbdinfo --size`, which performs NBD_OPT_GO: proof that the export
  exists AND its backing device opens. A listing proves neither.
- `list_export_names()` sends NBD_OPT_LIST on one connection. `nbdinfo --list` would also send
  NBD_OPT_INFO per export (~44 ms each on nbd-server, 89 s for 2000 exports), so names are read
  directly from the protocol instead.
- `copy()` runs `nbdcopy` (tests and the benchmark use it).
"""
from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import struct
from pathlib import Path
from urllib.parse import quote

from oma.shared.errors import BadGateway

NBDMAGIC = 0x4E42444D41474943          # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054          # "IHAVEOPT"
REPLY_MAGIC = 0x0003E889045565A9
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
OPT_ABORT = 2
OPT_LIST = 3
REP_ACK = 1
REP_SERVER = 2
REP_FLAG_ERROR = 1 << 31


# OSError numbers that mean "this process may not open another descriptor / process right now",
# not "the peer is gone": callers must not read them as a dead or silent server.
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.EAGAIN, errno.ENOMEM, errno.ENOBUFS})


def resource_error(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in RESOURCE_ERRNOS


def describe_oserror(exc: OSError) -> str:
    code = errno.errorcode.get(exc.errno or 0, "")
    return f"{exc.strerror or exc} ({code})" if code else str(exc)


class ExportCheckError(BadGateway):
    """An export could not be opened through a real NBD connection (nbdinfo's error in details)."""
    error = "NBD export check failed"


def nbd_uri(host: str, port: int, name: str = "", *, tls_username: str | None = None,
            psk_file: str | os.PathLike | None = None) -> str:
    """An NBD URI (NetworkBlockDevice/nbd doc/uri.md) that libnbd's nbd_connect_uri understands.
    With a PSK file: `nbds://USER@HOST:PORT/NAME?tls-psk-file=FILE` (TLS required; the PSK identity
    in the userinfo, as the spec says; libnbd 1.14 ignores a `tls-username` query parameter)."""
    h = f"[{host}]" if ":" in host and not host.startswith("[") else host
    if psk_file is None:
        return f"nbd://{h}:{port}/{quote(name)}"
    user = f"{quote(tls_username, safe='')}@" if tls_username else ""
    return f"nbds://{user}{h}:{port}/{quote(name)}?tls-psk-file={quote(os.fspath(psk_file))}"


def require_tool(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise FileNotFoundError(f"{tool} is not installed (Debian package libnbd-bin)")
    return path


async def _run(argv: list[str], timeout: float | None, stdin: int | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=stdin if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except (asyncio.TimeoutError, asyncio.CancelledError):
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    return proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")


async def export_size(uri: str, timeout: float = 10.0) -> int:
    """Size in bytes of the export at `uri`, through a real NBD_OPT_GO (`nbdinfo --size`).

    Raises ExportCheckError carrying nbdinfo's message: "server has no export named ..."
    (unknown export), "server policy prevents NBD_OPT_GO" (nbd-server: device does not open),
    "Connection refused" (server down).
    """
    try:
        rc, out, err = await _run([require_tool("nbdinfo"), "--size", uri], timeout)
    except asyncio.TimeoutError:
        raise ExportCheckError(details=f"{uri}: nbdinfo timed out after {timeout}s") from None
    if rc != 0:
        raise ExportCheckError(details=f"{uri}: {err.strip() or f'nbdinfo exited {rc}'}")
    try:
        return int(out.strip())
    except ValueError:
        raise ExportCheckError(details=f"{uri}: unexpected nbdinfo output {out!r}") from None


async def export_info(uri: str, timeout: float = 10.0) -> dict:
    """`nbdinfo --json` of one export (size, can_flush, can_fua, ...); ExportCheckError on failure."""
    rc, out, err = await _run([require_tool("nbdinfo"), "--json", uri], timeout)
    if rc != 0:
        raise ExportCheckError(details=f"{uri}: {err.strip()}")
    info = json.loads(out)
    return info["exports"][0] if info.get("exports") else info


async def _greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    magic, opt_magic, _flags = struct.unpack(">QQH", await reader.readexactly(18))
    if magic != NBDMAGIC or opt_magic != IHAVEOPT:
        raise ConnectionError("not a newstyle NBD server")
    writer.write(struct.pack(">I", FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))


async def _option(writer: asyncio.StreamWriter, opt: int, data: bytes = b"") -> None:
    writer.write(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)
    await writer.drain()


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass


async def handshake(host: str, port: int, timeout: float = 2.0) -> bool:
    """True when an NBD server greets us on host:port (then NBD_OPT_ABORT). Raises only a
    resource OSError (EMFILE, ...): running out of descriptors says nothing about the server."""
    async def go() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            await _greet(reader, writer)
            await _option(writer, OPT_ABORT)
        finally:
            await _close(writer)
    try:
        await asyncio.wait_for(go(), timeout)
        return True
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError) as exc:
        if resource_error(exc):
            raise
        return False


async def list_export_names(host: str, port: int, timeout: float = 10.0) -> list[str]:
    """Export names the server lists (NBD_OPT_LIST). A listed export may still fail to open:
    use export_size() to prove one. Raises ExportCheckError if the server cannot list."""
    async def go() -> list[str]:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            await _greet(reader, writer)
            await _option(writer, OPT_LIST)
            names: list[str] = []
            while True:
                magic, _opt, rtype, length = struct.unpack(">QIII", await reader.readexactly(20))
                data = await reader.readexactly(length) if length else b""
                if magic != REPLY_MAGIC:
                    raise ConnectionError("bad option reply magic")
                if rtype == REP_ACK:
                    break
                if rtype & REP_FLAG_ERROR:
                    raise ConnectionError(f"server refused NBD_OPT_LIST (reply {rtype:#x}); "
                                          "nbd-server needs `allowlist = true`")
                if rtype == REP_SERVER:
                    (n,) = struct.unpack(">I", data[:4])
                    names.append(data[4:4 + n].decode())
            await _option(writer, OPT_ABORT)
            return names
        finally:
            await _close(writer)
    try:
        return await asyncio.wait_for(go(), timeout)
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError) as e:
        raise ExportCheckError(details=f"{nbd_uri(host, port)}: listing failed: {e!r}") from None


async def copy(src: str | Path, dst: str | Path, *, flush: bool = True, timeout: float | None = None,
               extra: list[str] | None = None) -> None:
    """`nbdcopy [--flush] SRC DST` (files or nbd:// URIs); RuntimeError with stderr on failure."""
    argv = [require_tool("nbdcopy"), *(["--flush"] if flush else []), *(extra or []), str(src), str(dst)]
    rc, _out, err = await _run(argv, timeout)
    if rc != 0:
        raise RuntimeError(f"nbdcopy {src} {dst} failed ({rc}): {err.strip()}")
