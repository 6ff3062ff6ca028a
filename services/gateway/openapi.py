"""The OpenAPI document at /openapi.json, made from FastAPI's and then corrected to what the API does.

- OpenAPI 3.0.3, valid as such: the bundled Swagger UI 4 renders 3.0 only, so pydantic's JSON
  Schema 2020-12 constructs (`anyOf [.., null]`, `const`, numeric `exclusiveMinimum`, `examples`
  lists) are rewritten to their 3.0 forms. Schemathesis reads the document by its declared version:
  a 2020-12 keyword in a "3.0.3" document is a part it cannot generate data for.
- An HTTP bearer scheme on every operation whose route depends on the session check, so Swagger's
  Authorize button works and clients know which calls need `Authorization: Bearer`.
- 400 in the seed's error shape wherever a request can fail validation; FastAPI's 422 (which the
  gateway never answers, services/gateway/errors.py turns it into 400) is removed.
- A request body's examples (the seed's, on the pydantic models) become named media type examples.
- Server-Sent Events streams lose OpenAPI 3.2's `itemSchema`.
"""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi import routing
from fastapi.openapi.utils import get_openapi

from oma.services.gateway.guard import is_protected

BEARER = "bearerAuth"
SECURITY_SCHEME = {"type": "http", "scheme": "bearer", "bearerFormat": "session token",
                   "description": "The `session_token` of `POST /api/v1/auth/login`."}
VALIDATION_SCHEMAS = ("HTTPValidationError", "ValidationError")
BAD_REQUEST = {"description": "Bad request: invalid JSON or a field out of bounds (`details` names it)",
               "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}}


def install(app: FastAPI) -> None:
    """Serve `build(app)` as the app's OpenAPI document (built once, on first use)."""
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def build(app: FastAPI) -> dict[str, Any]:
    doc = get_openapi(title=app.title, version=app.version, openapi_version="3.0.3",
                      description=app.description, routes=app.routes)
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    components["securitySchemes"] = {BEARER: SECURITY_SCHEME}
    for route in _api_routes(app):
        for method in route.methods:
            op = doc["paths"][route.path_format][method.lower()]
            if is_protected(route.path_format):  # the one rule RequestGuard enforces
                op["security"] = [{BEARER: []}]
            responses = op["responses"]
            if responses.pop("422", None) is not None:  # FastAPI adds it where a request is validated
                responses.setdefault("400", BAD_REQUEST)
            _body_examples(op, schemas)
    for name in VALIDATION_SCHEMAS:
        schemas.pop(name, None)
    for name, schema in schemas.items():
        schemas[name] = to_oas30(schema)
    for item in doc["paths"].values():
        for op in item.values():
            for param in op.get("parameters", ()):
                param["schema"] = to_oas30(param["schema"], nullable=False)  # a query value is never null
            for where in (op.get("requestBody"), *op["responses"].values()):
                for media in (where or {}).get("content", {}).values():
                    # FastAPI's EventSourceResponse adds OpenAPI 3.2's `itemSchema` (one SSE event);
                    # 3.0 has no such key: the stream is a string, its description names the events.
                    if media.pop("itemSchema", None) is not None:
                        media.setdefault("schema", {"type": "string"})
                    if "schema" in media:
                        media["schema"] = to_oas30(media["schema"])
    return doc


def _api_routes(app: FastAPI) -> list[Any]:
    """The routes in the document. FastAPI >= 0.16x keeps an included router whole and gives its
    routes as contexts (with the router's dependencies); older ones copy them into app.routes."""
    iterate = getattr(routing, "iter_route_contexts", None)
    routes = iterate(app.routes) if iterate else app.routes
    return [r for r in routes if isinstance(getattr(r, "original_route", r), routing.APIRoute) and r.include_in_schema]


def _body_examples(op: dict[str, Any], schemas: dict[str, Any]) -> None:
    """The model's `examples` list, named by `action` where there is one, on the JSON media type."""
    media = op.get("requestBody", {}).get("content", {}).get("application/json")
    ref = (media or {}).get("schema", {}).get("$ref", "")
    examples = schemas.get(ref.rsplit("/", 1)[-1], {}).get("examples")
    if not examples:
        return
    named: dict[str, Any] = {}
    for value in examples:
        name = str(value.get("action") or value.get("status") or "seed")
        if "id" in value:
            name += " by id"
        name = name if name not in named else f"{name} {len(named) + 1}"
        named[name] = {"summary": name, "value": value}
    media["examples"] = named


def to_oas30(schema: Any, nullable: bool = True) -> Any:
    """A pydantic JSON Schema (2020-12) rewritten as an OpenAPI 3.0 Schema Object."""
    if isinstance(schema, list):
        return [to_oas30(s, nullable) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (v if k in ("properties", "default", "enum", "example", "examples") else to_oas30(v, nullable))
           for k, v in schema.items()}
    if "properties" in out:
        out["properties"] = {k: to_oas30(v, nullable) for k, v in out["properties"].items()}
    branches = out.get("anyOf")
    if branches is not None and {"type": "null"} in branches:
        rest = [b for b in branches if b != {"type": "null"}]
        del out["anyOf"]
        if len(rest) == 1:
            out = {**rest[0], **out} if "$ref" not in rest[0] else {"allOf": rest, **out}
        elif rest:
            out["anyOf"] = rest
        if nullable:
            out["nullable"] = True
    if "const" in out:
        out["enum"] = [out.pop("const")]
    for bound, exclusive in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
        if isinstance(out.get(exclusive), (int, float)) and not isinstance(out[exclusive], bool):
            out[bound], out[exclusive] = out[exclusive], True
    if isinstance(out.get("examples"), list):
        examples = out.pop("examples")
        if examples:
            out["example"] = examples[0]
    if "$ref" in out and len(out) > 1:  # 3.0 ignores a $ref's siblings: keep them beside an allOf
        out = {"allOf": [{"$ref": out.pop("$ref")}], **out}
    return out
