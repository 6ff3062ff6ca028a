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
import os
import threading
from collections import deque

_lib: ctypes.CDLL | None = None
_lock = threading.Lock()
REQUEST = 4 << 20  # bytes per NBD write request
DEPTH = 4  # write requests in flight per connection: the server works while the next chunk is read


class _Completion(ctypes.Structure):
    """libnbd's nbd_completion_callback, passed by value; all NULL: completion is polled instead."""
    _fields_ = [("callback", ctypes.c_void_p), ("user_data", ctypes.c_void_p), ("free", ctypes.c_void_p)]


_NO_CALLBACK = _Completion(None, None, None)


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
            lib.nbd_aio_pwrite.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint64,
                                           _Completion, ctypes.c_uint32]
            lib.nbd_aio_pwrite.restype = ctypes.c_int64
            lib.nbd_aio_command_completed.argtypes = [ctypes.c_void_p, ctypes.c_uint64]
            lib.nbd_poll.argtypes = [ctypes.c_void_p, ctypes.c_int]
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
        self._buffers: list[ctypes.Array] = []  # copy_from's, made on first use

    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        buf = (ctypes.c_char * len(data)).from_buffer_copy(data) if isinstance(data, memoryview) else data
        self._check(self._lib.nbd_pwrite(self._h, buf, len(data), offset, 0), f"write at {offset}")

    def copy_from(self, fd: int, offset: int, length: int) -> None:
        """Write `length` bytes of the file `fd`, from `offset`, at the same offset: up to DEPTH
        requests in flight (libnbd's aio calls), read into this connection's reused buffers (no
        allocation per request). Blocking: call in a worker thread."""
        if not self._buffers:
            self._buffers = [ctypes.create_string_buffer(REQUEST) for _ in range(DEPTH)]
        lib, end = self._lib, offset + length
        free = list(range(DEPTH))
        inflight: deque[tuple[int, int]] = deque()  # (cookie, buffer)
        while offset < end or inflight:
            while free and offset < end:
                i = free.pop()
                n = min(REQUEST, end - offset)
                if os.preadv(fd, [memoryview(self._buffers[i])[:n]], offset) != n:
                    raise NbdError(f"short read of the source at {offset}")
                cookie = self._check(lib.nbd_aio_pwrite(self._h, self._buffers[i], n, offset, _NO_CALLBACK, 0),
                                     f"write at {offset}")
                inflight.append((cookie, i))
                offset += n
            cookie, i = inflight[0]
            while not self._check(lib.nbd_aio_command_completed(self._h, cookie), "write"):
                self._check(lib.nbd_poll(self._h, -1), "poll")
            inflight.popleft()
            free.append(i)

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
