"""Structured logging: one JSON (or logfmt) line per record, with the request's correlation id."""
from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
from typing import Any

correlation_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("correlation_id", default=None)

_STD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "correlation_id"}
_base_factory = logging.getLogRecordFactory()


def _record_factory(*args, **kwargs) -> logging.LogRecord:
    # Read the correlation id when the record is made, in the request's own context.
    record = _base_factory(*args, **kwargs)
    record.correlation_id = correlation_id.get()
    return record


logging.setLogRecordFactory(_record_factory)


class _Formatter(logging.Formatter):
    def __init__(self, fmt: str):
        super().__init__()
        self.fmt = fmt

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        cid = getattr(record, "correlation_id", None)
        if cid:
            out["correlation_id"] = cid
        out.update({k: v for k, v in record.__dict__.items() if k not in _STD and not k.startswith("_")})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if self.fmt == "json":
            return json.dumps(out, default=str)
        return " ".join(f"{_logfmt_key(k)}={_logfmt_value(v)}" for k, v in out.items())


# logfmt: a value is bare when it has no space, `=`, quote, backslash or control character, else a
# JSON string (quotes and backslashes escaped, newlines as \n): one record, one line, parseable.
_BARE = re.compile(r'[^\s="\\\x00-\x1f\x7f]+')
_UNICODE_BREAKS = re.compile("[\x80-\x9f\u2028\u2029]")  # JSON leaves them raw; some readers split there


def _logfmt_key(key: str) -> str:
    return re.sub(r'[\s="\\\x00-\x1f\x7f]', "_", key) or "_"


def _logfmt_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list, tuple)):
        text = json.dumps(value, default=str)
    else:
        text = str(value)
    if _BARE.fullmatch(text):
        return text
    return _UNICODE_BREAKS.sub(lambda m: f"\\u{ord(m.group()):04x}", json.dumps(text, ensure_ascii=False))


def setup_logging(debug: bool = False, fmt: str = "json") -> None:
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(fmt))
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    # SQL in debug mode only (the seed's "database query logging in debug mode"); parameters are
    # hidden by the engines (hide_parameters=True).
    logging.getLogger("sqlalchemy.engine").setLevel(logging.INFO if debug else logging.WARNING)
    logging.getLogger("asyncmy").setLevel(logging.ERROR)  # server notes such as "database exists"
    for noisy in ("uvicorn.access", "aiosqlite", "asyncio", "urllib3", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
