"""The simulated VMware disks: sparse files with deterministic content and a CBT model.

A disk is split into blocks (64 KiB). At creation, a seeded choice of blocks gets seeded random
data and the rest stay holes, so the same VM and disk always read the same bytes. Changed block
tracking follows VMware's model: a disk has a change id `"<52 xx ... 16 bytes>/<sequence>"`; a
snapshot hands out the current id and starts a new sequence; every write records the sequence it
happened in; the areas changed since an id are the blocks written in a later sequence. The CBT
state is kept next to the image (`<image>.cbt.json`), so it survives a restart of the simulator.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import random
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

BLOCK = 64 * 1024
DEFAULT_DENSITY = 0.5  # share of blocks holding data at creation; the rest are holes


class UnknownChangeId(ValueError):
    """A change id this disk did not hand out (another disk's, or newer than the disk's)."""


@dataclass
class DiskImage:
    path: Path
    size: int
    cbt_uuid: str  # 32 hex digits, fixed per disk (VMware resets it when CBT is re-enabled)
    sequence: int = 0
    written: dict[int, int] = field(default_factory=dict)  # block -> sequence of its last write
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False, compare=False)

    # -- creation and persistence ---------------------------------------------------------

    @classmethod
    def open(cls, path: Path, size: int, seed: str, density: float = DEFAULT_DENSITY) -> DiskImage:
        """The disk at `path`, created with seeded content when missing (blocking: call in a thread)."""
        meta = _meta_path(path)
        if path.exists() and meta.exists():
            state = json.loads(meta.read_text())
            return cls(path, state["size"], state["cbt_uuid"], state["sequence"],
                       {int(k): v for k, v in state["written"].items()})
        path.parent.mkdir(parents=True, exist_ok=True)
        size = max(BLOCK, math.ceil(size / BLOCK) * BLOCK)
        rng = random.Random(hashlib.sha256(seed.encode()).digest())
        with open(path, "wb") as f:
            f.truncate(size)
            for block in range(size // BLOCK):
                if rng.random() < density:
                    f.seek(block * BLOCK)
                    f.write(rng.randbytes(BLOCK))
        disk = cls(path, size, uuid.UUID(bytes=hashlib.md5(seed.encode()).digest()).hex)
        disk.save()
        return disk

    def save(self) -> None:
        tmp = _meta_path(self.path).with_suffix(".tmp")
        tmp.write_text(json.dumps({"size": self.size, "cbt_uuid": self.cbt_uuid, "sequence": self.sequence,
                                   "written": self.written}))
        tmp.replace(_meta_path(self.path))

    # -- CBT ------------------------------------------------------------------------------

    @property
    def change_id(self) -> str:
        hexed = " ".join(self.cbt_uuid[i:i + 2] for i in range(0, 32, 2))
        return f"{hexed}/{self.sequence}"

    def snapshot(self) -> str:
        """Freeze the current state: return its change id and start a new sequence."""
        taken = self.change_id
        self.sequence += 1
        self.save()
        return taken

    def parse(self, change_id: str) -> int:
        """The sequence of one of this disk's change ids."""
        prefix, _, seq = change_id.strip().rpartition("/")
        if prefix.replace(" ", "") != self.cbt_uuid or not seq.isdigit() or int(seq) >= self.sequence:
            raise UnknownChangeId(f"change id {change_id!r} was not issued by this disk")
        return int(seq)

    def changed_since(self, change_id: str) -> list[tuple[int, int]]:
        """(offset, length) runs of the blocks written after the snapshot `change_id`."""
        since = self.parse(change_id)
        blocks = sorted(b for b, seq in self.written.items() if seq > since)
        return list(_runs(blocks))

    def mutate(self, percent: float) -> int:
        """Write random data over `percent` of the blocks, as a guest would; returns bytes written
        (blocking: call in a thread, holding `lock`)."""
        count = self.size // BLOCK
        chosen = random.sample(range(count), max(1, min(count, round(count * percent / 100))))
        with open(self.path, "r+b") as f:
            for block in chosen:
                f.seek(block * BLOCK)
                f.write(os.urandom(BLOCK))
                self.written[block] = self.sequence
        self.save()
        return len(chosen) * BLOCK

    # -- reading --------------------------------------------------------------------------

    def extents(self) -> Iterator[tuple[int, int, bool]]:
        """(offset, length, is_data) over the whole disk, from the file's own holes (SEEK_DATA)."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            offset = 0
            while offset < self.size:
                try:
                    data = os.lseek(fd, offset, os.SEEK_DATA)
                except OSError:  # ENXIO: only a hole is left
                    data = self.size
                if data > offset:
                    yield offset, min(data, self.size) - offset, False
                if data >= self.size:
                    break
                hole = min(os.lseek(fd, data, os.SEEK_HOLE), self.size)
                yield data, hole - data, True
                offset = hole
        finally:
            os.close(fd)


def _meta_path(path: Path) -> Path:
    return path.with_name(path.name + ".cbt.json")


def _runs(blocks: list[int]) -> Iterator[tuple[int, int]]:
    start = prev = None
    for b in blocks:
        if start is None:
            start = prev = b
        elif b == prev + 1:
            prev = b
        else:
            yield start * BLOCK, (prev - start + 1) * BLOCK
            start = prev = b
    if start is not None:
        yield start * BLOCK, (prev - start + 1) * BLOCK
