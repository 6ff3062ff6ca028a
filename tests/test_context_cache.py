"""The VM-context reads' reply caches (shared/replies.py) in the aggregator and the gateway, and the
gateway's fast path for them (services/gateway/fastpath.py): same answers, never stale."""
from __future__ import annotations

import asyncio

import pytest

from conftest import assert_error_shape, login, mariadb_settings, running, wait_for
from oma.shared.replies import REFRESHING, Replies
from oma.shared.settings import SERVICES
from oma.shared.subjects import Contexts
from test_contexts import Clock, Job, bus, ctx_settings, get_ctx, publish, until  # noqa: F401 - fixtures

FOREVER = 3600.0  # so that only the change notifications can make a reply fresh again


def caches(client) -> tuple[Replies, Replies]:
    return client.app.state.context_replies, client.appliance.services["context_aggregator"].replies


def test_replies_keep_no_reply_read_before_a_change():
    r = Replies(ttl=FOREVER, max_bytes=800)
    before = r.generation
    r.changed(["vm-1"])
    r.put_vm("vm-1", before, b"old", "vm-1")  # read before the change, stored after it: dropped
    assert r.get_vm("vm-1") is None
    r.put_vm("vm-1", r.generation, b"new", "vm-1")
    r.put_vm("VM-1", r.generation, b"new", "vm-1")  # another spelling: not kept
    assert r.get_vm("VM-1") is None
    r.put_list(("x", 100, 0), r.generation, b"page")
    r.changed(["vm-2"])  # another VM: vm-1 stays, every page goes
    assert (r.get_vm("vm-1"), r.get_list(("x", 100, 0))) == (b"new", None)
    r.changed(None)
    assert r.get_vm("vm-1") is None


def test_replies_stay_within_their_bytes_and_time():
    r = Replies(ttl=FOREVER, max_bytes=800)
    for i in range(10):
        r.put_vm(f"vm-{i}", r.generation, b"x" * 100, f"vm-{i}")
    assert [r.get_vm(f"vm-{i}") is not None for i in range(10)] == [False] * 2 + [True] * 8
    r.put_vm("huge", r.generation, b"x" * 101, "huge")  # above an eighth of the whole: never kept
    assert r.get_vm("huge") is None
    expired = Replies(ttl=0)
    expired.put_vm("vm", expired.generation, b"x", "vm")
    assert expired.get_vm("vm") is None


def test_a_reply_near_its_end_is_due_for_one_refresh(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr("oma.shared.replies.time.monotonic", lambda: now[0])
    r = Replies(ttl=60.0, max_bytes=800)
    r.put_vm("vm-1", r.generation, b"a", "vm-1")
    r.put_list(("x", 100, 0), r.generation, b"page")
    now[0] += 29.0  # more than half its life left: served, not due
    assert r.get_vm("vm-1") == b"a" and not r.due_vm("vm-1") and not r.due_list(("x", 100, 0))
    now[0] += 2.0  # in its second half: due once, however often it is read meanwhile
    assert r.due_vm("vm-1") and not r.due_vm("vm-1") and r.due_list(("x", 100, 0))
    r.put_vm("vm-1", r.generation, b"b", "vm-1")  # the refresh read it again
    r.refreshed("vm", "vm-1")
    r.refreshed("list", ("x", 100, 0))  # that one's read failed: not stored
    assert r.get_vm("vm-1") == b"b" and not r.due_vm("vm-1")
    now[0] += 31.0
    assert r.due_vm("vm-1") and r.get_list(("x", 100, 0)) is None  # the page was not refreshed: gone
    assert not r.due_vm("nobody")
    for i in range(REFRESHING):
        r.put_vm(f"vm-{i + 2}", r.generation, b"c", f"vm-{i + 2}")
    now[0] += 31.0
    # vm-1 is still being refreshed: REFRESHING - 1 more at once, the last waits for a later read
    assert [r.due_vm(f"vm-{i + 2}") for i in range(REFRESHING)] == [True] * (REFRESHING - 1) + [False]
    r.refreshed("vm", "vm-1")
    assert r.due_vm(f"vm-{REFRESHING + 1}")


async def test_a_polled_reply_is_refreshed_before_it_expires(ctx_settings, bus):
    """Read in the second half of its life, the aggregator's reply is served and read again beside,
    so a VM polled all along never costs a database read in line."""
    clock = Clock()
    job = Job(clock, "ahead-vm", "job-ahead-1")
    async with running(ctx_settings(), SERVICES) as client:
        h = await login(client)
        await publish(bus, [job.event("created")])
        await until(client, h, "ahead-vm", lambda b: b["context"]["current_status"] == "queued")
        gateway, aggregator = caches(client)
        gateway.ttl, gateway.max_bytes = 0.0, 0  # every read reaches the aggregator
        aggregator.ttl = 2.0
        aggregator.changed(None)
        await get_ctx(client, h, "ahead-vm")
        first = aggregator._vms["ahead-vm"][0]
        await asyncio.sleep(1.3)  # in its second half
        assert (await get_ctx(client, h, "ahead-vm")).status_code == 200
        await wait_for(lambda: _true(aggregator._vms.get("ahead-vm", (0,))[0] > first + 1.0), timeout=3)
        await asyncio.sleep(0.5)  # past the first reply's end: still cached
        assert aggregator.get_vm("ahead-vm") is not None


async def _true(value: bool) -> bool:
    return value


@pytest.mark.nats_forbidden  # asks REBUILD (oma-admin's) over the aggregator's connection, a shortcut
async def test_a_change_reaches_polled_replies_at_once(ctx_settings, bus):
    clock = Clock()
    job = Job(clock, "cache-vm", "job-cache-1")
    async with running(ctx_settings(), SERVICES) as client:
        for cache in caches(client):
            cache.ttl = FOREVER
        h = await login(client)
        await publish(bus, [job.event("created")])
        await until(client, h, "cache-vm", lambda b: b["context"]["current_status"] == "queued")
        gateway, aggregator = caches(client)

        async def cached() -> bool:  # once the change notifications of the batch are through
            page = await client.get("/api/v1/vm-contexts", headers=h)
            detail = await get_ctx(client, h, "cache-vm")
            return (page.json()["total"] == 1 and gateway.get_list((100, 0)) == page.content
                    and gateway.get_vm("cache-vm") == aggregator.get_vm("cache-vm") == detail.content)
        await wait_for(cached, timeout=5)

        # A new status and a new VM: both caches drop what changed, the next read is fresh.
        other = Job(clock, "cache-vm-2", "job-cache-2")
        await publish(bus, [job.event("status_changed", status="provisioning"), other.event("created")])
        await until(client, h, "cache-vm", lambda b: b["context"]["current_status"] == "provisioning")
        page = (await client.get("/api/v1/vm-contexts", headers=h)).json()
        assert [c["vm_name"] for c in page["vm_contexts"]] == ["cache-vm", "cache-vm-2"] and page["total"] == 2

        # REBUILD drops everything, in the gateway too.
        assert gateway.get_list((100, 0)) and aggregator.get_list((None, 100, 0))
        await client.appliance.services["context_aggregator"].bus.call(Contexts.REBUILD, {}, timeout=60)

        async def dropped() -> bool:
            return gateway.get_list((100, 0)) is None and aggregator.get_list((None, 100, 0)) is None
        await wait_for(dropped, timeout=5)


async def test_the_fast_path_answers_as_fastapi_does(ctx_settings, bus):
    clock = Clock()
    async with running(ctx_settings(), SERVICES) as client:
        h = await login(client)
        await publish(bus, [Job(clock, f"fp-{i}", f"job-fp-{i}").event("created") for i in range(3)])
        await until(client, h, "fp-2", lambda b: True)
        fast = await client.get("/api/v1/vm-contexts?limit=2&offset=1", headers=h)
        slow = await client.get("/api/v1/vm-contexts?limit=02&offset=1", headers=h)  # FastAPI's way
        assert fast.status_code == slow.status_code == 200 and fast.content == slow.content
        assert fast.headers["content-type"] == slow.headers["content-type"] == "application/json"
        assert [c["vm_name"] for c in fast.json()["vm_contexts"]] == ["fp-1", "fp-2"]
        body = assert_error_shape(await client.get("/api/v1/vm-contexts?limit=0", headers=h), 400)
        assert body["error"] == "Validation failed" and "limit" in body["details"]
        missing = assert_error_shape(await get_ctx(client, h, "nope"), 404)
        assert missing["error"] == "VM context not found"
        assert_error_shape(await client.get("/api/v1/vm-contexts"), 401)
        assert_error_shape(await client.get("/api/v1/vm-contexts/fp-1", headers={"Authorization": "Bearer x"}), 401)


async def test_a_vm_asked_by_another_spelling_is_not_cached_under_it(ctx_settings, bus, mariadb_name):
    """MariaDB compares names case-insensitively; a change is announced under the stored name."""
    clock = Clock()
    job = Job(clock, "Mixed-Case-VM", "job-mixed-1")
    async with running(ctx_settings(**mariadb_settings(mariadb_name)), SERVICES) as client:
        for cache in caches(client):
            cache.ttl = FOREVER
        h = await login(client)
        await publish(bus, [job.event("created")])
        await until(client, h, "Mixed-Case-VM", lambda b: True)
        assert (await get_ctx(client, h, "mixed-case-vm")).json()["context"]["current_status"] == "queued"
        assert all(c.get_vm("mixed-case-vm") is None for c in caches(client))
        await publish(bus, [job.event("status_changed", status="provisioning")])
        await until(client, h, "mixed-case-vm", lambda b: b["context"]["current_status"] == "provisioning")
