"""Structured logging: one JSON (or logfmt) line per record, with the request's correlation id."""
from __future__ import annotations

import contextvars
import json
import logging
import sys
import time

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
        return " ".join(f"{k}={json.dumps(v, default=str) if isinstance(v, str) and (' ' in v or not v) else v}"
                        for k, v in out.items())


def setup_logging(debug: bool = False, fmt: str = "json") -> None:
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(fmt))
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    # SQL in debug mode only; parameters are hidden by the engines (hide_parameters=True).
    logging.getLogger("sqlalchemy.engine").setLevel(logging.INFO if debug else logging.WARNING)
    logging.getLogger("asyncmy").setLevel(logging.ERROR)  # server notes such as "database exists"
    for noisy in ("uvicorn.access", "aiosqlite", "asyncio", "urllib3", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
