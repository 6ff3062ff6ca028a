"""Serialized replies of the VM-context reads, kept until the read model changes.

Used twice with the same rules: by the context aggregator (a polled page costs no query) and by
each gateway process (a polled page costs no bus round trip). The read model changes only through
the aggregator's batches and REBUILD; each change drops, at once, every list page and the replies
of the VMs it touched (`changed`). The aggregator calls it itself; it also announces the change on
`Contexts.EVT_CHANGED` (core NATS) before anything else, and the gateways call it from there.

- `generation` keeps a reply read before a change from being stored after it;
- `ttl` bounds a reply's life should a change go unseen (a second aggregator writing to the same
  database, a notification dropped by a slow consumer); it is a safety net, not the invalidation,
  and long (5 minutes) because a reply that expires is read again in line: over 2,000 VMs polled
  at 4,000 requests/s, 10 s would make 5% of the reads misses, and with 60 s bench/bench_api.py's
  runs, 40 s apart, met every third one with all 2,000 expired (p99 35-42 ms);
- a reply read in the second half of its `ttl` is `due`: its reader serves it and has it read again
  in the background (once), so a reply read at least every `ttl / 2` never expires in line (2,000
  VMs' replies filled at once do not all expire in line at once);
  at most `REFRESHING` at a time, or those 2,000 come due at once (p99 1 s behind them): a reply
  not claimed now is claimed by a later read;
- at most `max_bytes` are kept, the oldest replies dropped first.
"""
from __future__ import annotations

import time
from collections.abc import Awaitable
from typing import Any, Hashable


TTL = 300.0  # seconds a reply is kept without a change notification
AHEAD = 0.5  # the share of a reply's ttl, at its end, in which a read has it refreshed
REFRESHING = 2  # refreshes under way at once, per cache


class Replies:
    def __init__(self, ttl: float = TTL, max_bytes: int = 32 << 20):
        self.ttl, self.max_bytes = ttl, max_bytes
        self.generation = 0
        self._lists: dict[Hashable, tuple[float, bytes]] = {}
        self._vms: dict[str, tuple[float, bytes]] = {}
        self._bytes = 0
        self._refreshing: set[tuple[str, Hashable]] = set()

    def due_list(self, key: Hashable) -> bool:
        return self._due(self._lists, key, ("list", key))

    def due_vm(self, vm_name: str) -> bool:
        return self._due(self._vms, vm_name, ("vm", vm_name))

    def refreshed(self, kind: str, key: Hashable) -> None:
        """The background read of a `due` reply ended (stored or not)."""
        self._refreshing.discard((kind, key))

    async def refresh(self, kind: str, key: Hashable, read: Awaitable[Any]) -> Exception | None:
        """Run the background read of a `due` reply (`read` stores it), then release its claim. A
        failed read (the VM gone, the bus down) is returned, not raised: the reply then expires."""
        try:
            await read
            return None
        except Exception as exc:  # noqa: BLE001 - the caller decides whether to log it
            return exc
        finally:
            self.refreshed(kind, key)

    def _due(self, store: dict, key: Any, tag: tuple[str, Hashable]) -> bool:
        """True once per reply near its end: the caller reads it again (then calls `refreshed`)."""
        hit = store.get(key)
        if (hit is None or tag in self._refreshing or len(self._refreshing) >= REFRESHING
                or hit[0] - time.monotonic() > self.ttl * AHEAD):
            return False
        self._refreshing.add(tag)
        return True

    def get_list(self, key: Hashable) -> bytes | None:
        return self._fresh(self._lists, key)

    def get_vm(self, vm_name: str) -> bytes | None:
        return self._fresh(self._vms, vm_name)

    def put_list(self, key: Hashable, generation: int, body: bytes) -> None:
        self._put(self._lists, key, generation, body)

    def put_vm(self, vm_name: str, generation: int, body: bytes, stored_name: str) -> None:
        """Kept only when asked by the stored name: MariaDB also finds `VM-1` for `vm-1`, and a
        change is announced under the stored name."""
        if vm_name == stored_name:
            self._put(self._vms, vm_name, generation, body)

    def changed(self, vm_names: Any = None) -> None:
        """After a change: every list page, and the named VMs (all when None)."""
        self.generation += 1
        for store, keys in ((self._lists, None), (self._vms, vm_names)):
            for key in list(store) if keys is None else keys:
                hit = store.pop(key, None)
                if hit is not None:
                    self._bytes -= len(hit[1])

    def _fresh(self, store: dict, key: Any) -> bytes | None:
        hit = store.get(key)
        return hit[1] if hit is not None and hit[0] > time.monotonic() else None

    def _put(self, store: dict, key: Any, generation: int, body: bytes) -> None:
        if generation != self.generation or len(body) > self.max_bytes // 8:
            return
        old = store.pop(key, None)
        self._bytes += len(body) - (len(old[1]) if old else 0)
        store[key] = (time.monotonic() + self.ttl, body)
        while self._bytes > self.max_bytes:  # the oldest entries first (dicts keep insertion order)
            victim = self._vms if self._vms else self._lists
            self._bytes -= len(victim.pop(next(iter(victim)))[1])
