"""A minimal binding of libnbd (the C library behind nbdcopy and python3-libnbd) through ctypes.

python3-libnbd is a Debian package that imports only into Debian's own interpreter, not into
the project's; libnbd.so.0 itself (from libnbd0, a dependency of libnbd-bin) loads anywhere.
The simulator needs exact offsets (an incremental writes only changed extents), byte counts
and fault points, so it drives libnbd call by call rather than running nbdcopy. The calls
block and release the GIL: run them in a worker thread.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import threading

_lib: ctypes.CDLL | None = None
_lock = threading.Lock()


class NbdError(OSError):
    """A libnbd call failed; the text is libnbd's own (e.g. "connection refused")."""


def _load() -> ctypes.CDLL:
    global _lib
    with _lock:
        if _lib is None:
            name = ctypes.util.find_library("nbd") or "libnbd.so.0"
            try:
                lib = ctypes.CDLL(name)
            except OSError as exc:
                raise NbdError(f"libnbd is not installed ({exc}): apt-get install libnbd0") from None
            lib.nbd_create.restype = ctypes.c_void_p
            lib.nbd_close.argtypes = [ctypes.c_void_p]
            lib.nbd_get_error.restype = ctypes.c_char_p
            lib.nbd_get_errno.restype = ctypes.c_int
            lib.nbd_connect_uri.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
            lib.nbd_get_size.argtypes = [ctypes.c_void_p]
            lib.nbd_get_size.restype = ctypes.c_int64
            lib.nbd_pwrite.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                                       ctypes.c_uint64, ctypes.c_uint32]
            lib.nbd_zero.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint32]
            lib.nbd_can_zero.argtypes = [ctypes.c_void_p]
            lib.nbd_flush.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
            lib.nbd_shutdown.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
            _lib = lib
    return _lib


class NbdConnection:
    """One connection to one export: `NbdConnection("nbd://127.0.0.1:10809/name")`."""

    def __init__(self, uri: str):
        self._lib = _load()
        self._h = self._lib.nbd_create()
        if not self._h:
            raise NbdError(self._error("nbd_create"))
        if self._lib.nbd_connect_uri(self._h, uri.encode()) == -1:
            text = self._error(f"connecting to {uri}")
            self.close()
            raise NbdError(text)
        self.uri = uri
        self.size = self._check(self._lib.nbd_get_size(self._h), "get_size")
        self._can_zero = self._lib.nbd_can_zero(self._h) == 1

    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        buf = (ctypes.c_char * len(data)).from_buffer_copy(data) if isinstance(data, memoryview) else data
        self._check(self._lib.nbd_pwrite(self._h, buf, len(data), offset, 0), f"write at {offset}")

    def zero(self, length: int, offset: int) -> None:
        """Zero a range (a hole of the source); writes zeros when the server cannot zero."""
        if self._can_zero:
            self._check(self._lib.nbd_zero(self._h, length, offset, 0), f"zero at {offset}")
            return
        chunk = bytes(min(length, 4 << 20))
        while length > 0:
            n = min(length, len(chunk))
            self.pwrite(chunk[:n], offset)
            offset, length = offset + n, length - n

    def flush(self) -> None:
        self._check(self._lib.nbd_flush(self._h, 0), "flush")

    def close(self) -> None:
        if self._h:
            self._lib.nbd_shutdown(self._h, 0)
            self._lib.nbd_close(self._h)
            self._h = None

    def _check(self, result: int, what: str) -> int:
        if result == -1:
            raise NbdError(self._error(what))
        return result

    def _error(self, what: str) -> str:
        text = self._lib.nbd_get_error()
        return f"{what}: {text.decode(errors='replace') if text else 'unknown libnbd error'}"

    def __enter__(self) -> NbdConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
