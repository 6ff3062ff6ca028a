"""Every publish a service or the gateway makes in any test is checked against its NATS user's
permissions (shared/natsauth.py). The tests' shared nats-server has no users, so without this a
service calling a subject its user may not publish works in the tests and fails on the secured
appliance (`oma-api`'s embedded NATS, ops/nats): this was found once, by hand, as a 504 on every
POST /api/v1/replications. Replies (to _INBOX subjects) are allowed by allow_responses; what a
test asks itself over a service's connection is the test's business."""
from __future__ import annotations

import sys
from functools import lru_cache
from pathlib import Path

from nats.aio.client import Client

from oma.shared import natsauth


def matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: `*` is one token, `>` one or more trailing tokens."""
    p, s = pattern.split("."), subject.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(s) > i
        if i >= len(s) or (token != "*" and token != s[i]):
            return False
    return len(p) == len(s)


@lru_cache(maxsize=None)
def allowed(user: str, subject: str) -> bool:
    perms = natsauth.permissions()[user]
    return (any(matches(p, subject) for p in perms.publish)
            and not any(matches(p, subject) for p in perms.deny_publish))


TESTS = str(Path(__file__).resolve().parent)


def from_a_test() -> bool:
    """The publish comes from a test's own code (asking a subject through a service's connection,
    a shortcut), not from a service: its awaiting frames reach a tests/test_*.py file."""
    f = sys._getframe(2)
    while f is not None:
        name = f.f_code.co_filename
        if name.startswith(TESTS) and Path(name).name.startswith("test_"):
            return True
        f = f.f_back
    return False


class Audit:
    def __init__(self) -> None:
        self.violations: list[str] = []
        self._original = Client.publish

    def install(self) -> None:
        audit, original = self, self._original

        async def publish(nc: Client, subject: str, *args, **kw):  # type: ignore[no-untyped-def]
            user = nc.options.get("name") or ""
            if (user in natsauth.USERS and not subject.startswith("_INBOX")
                    and not allowed(user, subject) and not from_a_test()):
                audit.violations.append(f"{user} published {subject}")
            return await original(nc, subject, *args, **kw)
        Client.publish = publish  # type: ignore[method-assign]

    def uninstall(self) -> None:
        Client.publish = self._original  # type: ignore[method-assign]

    def take(self) -> list[str]:
        found, self.violations = sorted(set(self.violations)), []
        return found
