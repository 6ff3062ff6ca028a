"""/metrics of a gateway worker: its own metrics and those of the services' process.

With OMA_PROCESSES > 1 the services run in oma-api's parent process, which serves its registry on
a loopback port (oma/runner.py). A scrape of the gateway port still gets every metric, as from
one process: the parent's samples are added to ours, except a series we have ourselves (the
process_* and python_* ones describe the worker that answers).
"""
from __future__ import annotations

import asyncio
import urllib.request

from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families


class _Merged:
    def __init__(self, families: list):
        self.families = families

    def collect(self):
        return self.families


def merge(theirs: str) -> bytes:
    families = {f.name: f for f in REGISTRY.collect()}
    for family in text_string_to_metric_families(theirs):
        # The text parser reads a counter's `_created` series as a gauge of its own.
        base = family.name.removesuffix("_created")
        if base != family.name and base in families:
            family.name = base
        mine = families.setdefault(family.name, family)
        if mine is not family:
            have = {(s.name, tuple(sorted(s.labels.items()))) for s in mine.samples}
            mine.samples += [s for s in family.samples if (s.name, tuple(sorted(s.labels.items()))) not in have]
    return generate_latest(_Merged(list(families.values())))  # type: ignore[arg-type]


async def with_other_process(url: str) -> bytes:
    """Ours alone when the parent does not answer (it is stopping): a scrape never fails on it."""
    try:
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    except OSError:
        return generate_latest()
    return merge(text)
