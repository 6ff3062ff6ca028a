"""Prometheus metrics shared by every service: prefix `oma_`, base units, bounded labels."""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

BUS_REQUESTS = Counter("oma_bus_requests_total", "Bus requests handled", ["service", "subject", "status"])
BUS_DURATION = Histogram("oma_bus_request_duration_seconds", "Bus request handling time",
                         ["service", "subject"],
                         buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 120))
BUS_IN_FLIGHT = Gauge("oma_bus_requests_in_flight", "Bus requests being handled", ["service"])
EVENTS_PUBLISHED = Counter("oma_events_published_total", "Events published to OMA_EVENTS", ["subject"])

HTTP_REQUESTS = Counter("oma_http_requests_total", "HTTP requests", ["method", "route", "status"])
HTTP_DURATION = Histogram("oma_http_request_duration_seconds", "HTTP request time", ["method", "route"],
                          buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 120))

DB_UP = Gauge("oma_db_up", "1 when the service's database answers", ["service"])
MIGRATIONS = Counter("oma_migrations_total", "Schema migration runs by result", ["service", "result"])
SERVICE_UP = Gauge("oma_service_up", "1 while the service runs", ["service"])
SSE_RESYNCS = Counter("oma_sse_resyncs_total", "SSE clients that fell behind and were sent the full state",
                      ["route"])
