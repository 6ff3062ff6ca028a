"""Logs and metrics an operator relies on: logfmt lines that parse back, `-debug` through the CLI
(SQL only then), the migration counter, and the gateway's request-timing lines."""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import text

from oma import cli
from oma.shared import db
from oma.shared.logging import _Formatter
from oma.shared.plugins import get_backend, get_plugin_manager
from tests.conftest import login, running

LOGFMT_PAIR = re.compile(r'([^\s=]+)=("(?:[^"\\]|\\.)*"|[^\s"]*)(?:\s|$)')


def parse_logfmt(line: str) -> dict[str, str]:
    """A strict reader: the whole line must be key=value pairs; quoted values are JSON strings."""
    pairs, pos = {}, 0
    for m in LOGFMT_PAIR.finditer(line):
        assert m.start() == pos, f"unparsed text at {pos}: {line[pos:m.start()]!r}"
        value = m.group(2)
        pairs[m.group(1)] = json.loads(value) if value.startswith('"') else value
        pos = m.end()
    assert pos == len(line), f"unparsed tail: {line[pos:]!r}"
    return pairs


def record(msg: str, **extra) -> logging.LogRecord:
    rec = logging.LogRecord("oma.test", logging.INFO, __file__, 1, msg, (), None)
    rec.__dict__.update(extra)
    return rec


AWKWARD = ['a=b', 'say "hi"', "two words", "line one\nline two", "back\\slash", "", "tab\there",
           "x=\"y\" z\\", "para\u2028graph", "nbd://oma@127.0.0.1:10809/disk?tls-psk-file=/a b"]


@pytest.mark.parametrize("value", AWKWARD)
def test_logfmt_escapes_and_parses_back(value: str):
    line = _Formatter("logfmt").format(record(value, detail=value, count=3, flag=True, gone=None))
    assert len(line.splitlines()) == 1, line
    parsed = parse_logfmt(line)
    assert parsed["msg"] == value and parsed["detail"] == value
    assert (parsed["count"], parsed["flag"], parsed["gone"], parsed["level"]) == ("3", "true", "null", "info")


def test_logfmt_keeps_plain_values_bare_and_structures_quoted():
    line = _Formatter("logfmt").format(record("started", port=8080, route="/api/v1/x", info={"a": "b c"}))
    assert " msg=started " in line and " port=8080 " in line and " route=/api/v1/x " in line
    assert parse_logfmt(line)["info"] == '{"a": "b c"}'


def test_logfmt_exception_stays_on_one_line():
    try:
        raise ValueError('bad "value" = here\nsecond line')
    except ValueError:
        import sys
        rec = logging.LogRecord("oma.test", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    line = _Formatter("logfmt").format(rec)
    assert len(line.splitlines()) == 1
    assert 'ValueError: bad "value" = here\nsecond line' in parse_logfmt(line)["exc"]


def test_json_lines_parse_back():
    line = _Formatter("json").format(record('a "quoted"\nmessage', detail="x=y"))
    assert len(line.splitlines()) == 1
    assert json.loads(line)["msg"] == 'a "quoted"\nmessage' and json.loads(line)["detail"] == "x=y"


# -- -debug through the command line ------------------------------------------------------------

MARKER = "marker-value-7f3a9c"


@pytest.fixture
def restore_logging():
    """The CLI configures the process's logging; put back what pytest had."""
    loggers = [logging.getLogger(n) for n in ("", "sqlalchemy.engine", "asyncmy", "aiosqlite", "oma.test")]
    saved = [(lg, lg.level, lg.handlers[:]) for lg in loggers]
    yield
    for lg, level, handlers in saved:
        lg.setLevel(level)
        lg.handlers[:] = handlers


def run_cli(argv: list[str], capsys) -> list[dict]:
    """`oma-api`'s own start (flags, settings, logging set-up, event loop) around a real query."""
    seen = {}

    async def work(settings):
        seen["debug"] = settings.debug
        storage = get_backend(get_plugin_manager(), "storage", settings.db_type).factory(settings)
        engine = await storage.create_engine("observability")
        try:
            async with engine.connect() as conn:
                await conn.execute(text("SELECT :marker AS value"), {"marker": MARKER})
        finally:
            await engine.dispose()
        logging.getLogger("oma.test").debug("a debug line")
        logging.getLogger("oma.test").info("an info line")

    capsys.readouterr()
    cli._run(work, "oma-api", argv)
    lines = capsys.readouterr().err.splitlines()
    assert seen["debug"] is ("-debug" in argv)
    return [json.loads(line) for line in lines if line.startswith("{")]


def test_debug_flag_turns_on_debug_and_sql_logging(capsys, restore_logging):
    records = run_cli(["-debug"], capsys)
    messages = [r["msg"] for r in records]
    assert "a debug line" in messages and "an info line" in messages
    sql = [r for r in records if r["logger"].startswith("sqlalchemy.engine")]
    assert any("SELECT ? AS value" in r["msg"] for r in sql), messages
    # Parameters never: the engines hide them.
    assert all(MARKER not in json.dumps(r) for r in records)


def test_without_debug_no_sql_and_no_debug_lines(capsys, restore_logging):
    records = run_cli([], capsys)
    messages = [r["msg"] for r in records]
    assert "an info line" in messages and "a debug line" not in messages
    assert [r for r in records if r["logger"].startswith("sqlalchemy")] == []
    assert all(r["level"] != "debug" for r in records)


# -- the migration metric ---------------------------------------------------------------------------

def migrations_total(service: str, result: str) -> float:
    return REGISTRY.get_sample_value("oma_migrations_total", {"service": service, "result": result}) or 0.0


async def test_migration_metric_counts_successes_and_failures(make_settings, tmp_path: Path, caplog):
    settings = make_settings()
    storage = get_backend(get_plugin_manager(), "storage", "memory").factory(settings)
    good = Path(db.__file__).resolve().parent.parent / "services" / "auth" / "migrations"
    bad = tmp_path / "migrations"
    (bad / "versions").mkdir(parents=True)
    (bad / "env.py").write_text((good / "env.py").read_text())
    (bad / "versions" / "0001_broken.py").write_text(
        'from alembic import op\nrevision = "broken_0001"\ndown_revision = None\n\n\n'
        'def upgrade() -> None:\n    op.execute("CREATE TABLE broken (")\n')

    engine = await storage.create_engine("metric_ok")
    before = migrations_total("metric_ok", "success")
    try:
        await db.run_migrations(engine, "metric_ok", good)
        await db.run_migrations(engine, "metric_ok", good)   # a second run is a run too (a no-op)
    finally:
        await engine.dispose()
    assert migrations_total("metric_ok", "success") == before + 2
    assert migrations_total("metric_ok", "failure") == 0

    engine = await storage.create_engine("metric_bad")
    caplog.set_level(logging.ERROR, logger="oma.db")
    try:
        with pytest.raises(Exception):
            await db.run_migrations(engine, "metric_bad", bad)
    finally:
        await engine.dispose()
    assert migrations_total("metric_bad", "failure") == 1
    assert migrations_total("metric_bad", "success") == 0
    failed = [r for r in caplog.records if r.getMessage() == "migration failed"]
    assert failed and failed[0].service == "metric_bad" and failed[0].exc_info


# -- request timing -----------------------------------------------------------------------------------

async def test_request_timing_lines(make_settings, caplog):
    """Each request is one `request` line with its route template, status and duration: a write or a
    4xx at INFO, a 5xx at WARNING, a fast successful read only at DEBUG (a dashboard polls)."""
    caplog.set_level(logging.DEBUG, logger="oma.gateway")
    async with running(make_settings(), ("auth", "context_aggregator")) as client:
        h = await login(client)
        caplog.clear()
        sent = {
            "timing-1": await client.post("/api/v1/auth/login", json={"appliance_id": "test-vma", "token": "no"},
                                          headers={"X-Request-ID": "timing-1"}),
            "timing-2": await client.get("/api/v1/vm-contexts", headers={**h, "X-Request-ID": "timing-2"}),
            "timing-3": await client.get("/api/v1/vm-contexts/some%2Fvm", headers={**h, "X-Request-ID": "timing-3"}),
            "timing-4": await client.get("/health", headers={"X-Request-ID": "timing-4"}),  # services missing
        }
    assert {k: r.status_code for k, r in sent.items()} == \
        {"timing-1": 401, "timing-2": 200, "timing-3": 404, "timing-4": 503}
    lines = {rec.correlation_id: rec for rec in caplog.records
             if rec.name == "oma.gateway" and rec.getMessage() == "request"}
    assert set(lines) >= set(sent), lines
    login_, listing, context, health = (lines[k] for k in sent)
    assert (login_.levelno, login_.method, login_.route, login_.status) == \
        (logging.INFO, "POST", "/api/v1/auth/login", 401)
    # A read is DEBUG unless it took over a second.
    assert (listing.method, listing.route, listing.status) == ("GET", "/api/v1/vm-contexts", 200)
    assert listing.levelno == (logging.DEBUG if listing.duration_ms <= 1000 else logging.INFO)
    # The route's template, never the raw path (bounded metric labels, no VM names).
    assert (context.levelno, context.route, context.status) == \
        (logging.INFO, "/api/v1/vm-contexts/{vm_name:path}", 404)
    assert (health.levelno, health.route, health.status) == (logging.WARNING, "/health", 503)
    for rec in lines.values():
        assert isinstance(rec.duration_ms, float) and 0 <= rec.duration_ms < 60_000
    # As an operator reads it: one logfmt line with every field.
    parsed = parse_logfmt(_Formatter("logfmt").format(login_))
    assert (parsed["msg"], parsed["correlation_id"], parsed["method"], parsed["status"]) == \
        ("request", "timing-1", "POST", "401")
    assert float(parsed["duration_ms"]) == login_.duration_ms
