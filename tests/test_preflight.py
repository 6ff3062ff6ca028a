"""Preflight's verdicts (shared/preflight.py) from the facts, each check's pass, warn and fail; the
facts themselves are read from real services in tests/test_scheduler.py (replication) and
tests/test_failover.py (failover)."""
from __future__ import annotations

import dataclasses

import pytest

from oma.shared import errors, preflight
from oma.shared.preflight import Facts


def ok(**changes) -> Facts:
    base = Facts(vm_name="db1", target_name="db1", new_disks=1, capacity=4, free_slots=4, cbt_enabled=True,
                 unmapped=[], volumes_known=True, names_known=True, custom_offering=True, power_state="poweredOn",
                 snapshots=0)
    return dataclasses.replace(base, **changes)


def by_check(facts: Facts, **kw) -> dict[str, dict[str, str]]:
    checks = preflight.evaluate(facts, **kw)
    assert [c["check"] for c in checks] == list(preflight.CHECKS)
    return {c["check"]: c for c in checks}


def test_every_check_passes_for_a_vm_that_can_move():
    assert {c["status"] for c in by_check(ok()).values()} == {"pass"}


@pytest.mark.parametrize("changes, check, status, words", [
    (dict(custom_offering=False), "disk_offering", "fail", "no customized disk offering"),
    (dict(custom_offering=None), "disk_offering", "warn", "could not be read"),
    (dict(power_state="poweredOff"), "power_state", "pass", "poweredOff"),
    (dict(power_state="suspended"), "power_state", "warn", "memory state is not migrated"),
    (dict(power_state=None), "power_state", "warn", "unknown"),
    (dict(cbt_enabled=False), "cbt", "fail", "CBT"),
    (dict(new_disks=5), "disk_slots", "fail", "at most 4"),
    (dict(volumes_available=0), "volume_limit", "fail", "volume limit is reached"),
    (dict(unmapped=["VM Network"]), "network", "fail", "'VM Network'"),
    (dict(taken_by="vm-9"), "target_name", "fail", "already exists"),
    (dict(snapshots=2), "snapshots", "warn", "has 2 snapshot(s): CBT is on"),
    (dict(snapshots=None), "snapshots", "warn", "the source did not report snapshots"),
])
def test_each_check_says_why(changes, check, status, words):
    got = by_check(ok(**changes))
    assert got[check]["status"] == status and words in got[check]["reason"], got[check]
    assert all(c["status"] == "pass" for name, c in got.items() if name != check)


def test_a_refusal_names_every_failed_check_and_a_warn_refuses_nothing():
    preflight.refuse_if_failed("db1", preflight.evaluate(ok(power_state="suspended", custom_offering=None)))
    with pytest.raises(errors.BadRequest) as caught:
        preflight.refuse_if_failed("db1", preflight.evaluate(ok(custom_offering=False, taken_by="vm-9")))
    assert caught.value.error == "Preflight failed"
    assert "disk_offering: " in caught.value.details and "target_name: " in caught.value.details
    assert "cbt" not in caught.value.details


def test_snapshots_with_cbt_off_fail_an_incremental_and_warn_a_full_copy():
    """CBT cannot be enabled (reset) while the VM has snapshots: with CBT off they must go first."""
    got = by_check(ok(cbt_enabled=False, snapshots=1))
    assert got["snapshots"]["status"] == "fail" and "remove them first" in got["snapshots"]["reason"]
    assert {n for n, c in got.items() if c["status"] == "fail"} == {"cbt", "snapshots"}
    full = by_check(ok(cbt_enabled=False, snapshots=1), incremental=False)
    assert full["snapshots"]["status"] == "warn" and full["cbt"]["status"] == "warn"
    unknown_cbt = by_check(ok(cbt_enabled=None, snapshots=1))  # not known off: no fail
    assert unknown_cbt["snapshots"]["status"] == "warn"
    assert by_check(ok(cbt_enabled=False, snapshots=0))["snapshots"]["status"] == "pass"
    with pytest.raises(errors.BadRequest) as caught:
        preflight.refuse_if_failed("db1", preflight.evaluate(ok(cbt_enabled=False, snapshots=3)))
    assert "snapshots: db1 has 3 snapshot(s) and CBT is off" in caught.value.details
