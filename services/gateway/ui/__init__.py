"""The operator web GUI under /ui: server-rendered pages (Jinja2 + htmx), live over SSE."""
from oma.services.gateway.ui.render import STATIC_DIR
from oma.services.gateway.ui.views import router

__all__ = ["STATIC_DIR", "router"]
