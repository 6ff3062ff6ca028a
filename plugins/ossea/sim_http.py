"""The CloudStack simulator over HTTP: the signed API (signature check, CloudStack's envelope and
error rules, hangs and latency before a call acts) and the unsigned /sim/ control endpoint."""
from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from oma.plugins.simserve import Served, json_body, loopback_only_control

from .signing import lookup, verify
from .sim_common import ApiError, _Args, _now

API_PATH = "/client/api"
AUTH_ERROR = "unable to verify user credentials and/or request signature"


class HttpApi(Served):
    """Mixed into CloudStackSimulator: serves it (the API, and the control endpoint over the other
    parts' methods). `async with` starts and stops it, or `await sim.start(host, port)` ...
    `await sim.stop()`."""

    def _init_http(self) -> None:
        self.host = "127.0.0.1"
        self.port = 0

    # -- lifecycle ------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[loopback_only_control])
        app.router.add_route("GET", API_PATH, self._api)
        app.router.add_route("POST", API_PATH, self._api)
        app.router.add_get("/sim/calls", self._ctl_calls)
        app.router.add_delete("/sim/calls", self._ctl_clear_calls)
        app.router.add_get("/sim/volumes", self._ctl_volumes)
        app.router.add_get("/sim/jobs", self._ctl_jobs)
        app.router.add_get("/sim/job-log", self._ctl_job_log)
        app.router.add_get("/sim/hazards", self._ctl_hazards)
        app.router.add_post("/sim/vms", self._ctl_add_vm)
        app.router.add_post("/sim/pre-attach", self._ctl_pre_attach)
        app.router.add_post("/sim/fail", self._ctl_fail)
        app.router.add_post("/sim/latency", self._ctl_latency)
        app.router.add_post("/sim/job-latency", self._ctl_job_latency)
        app.router.add_post("/sim/hang", self._ctl_hang)
        app.router.add_post("/sim/release", self._ctl_release)
        app.router.add_post("/sim/reset", self._ctl_reset)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        self.host, self.port = host, self._runner.addresses[0][1]
        return self.url

    async def stop(self) -> None:
        self.release()  # let hung requests answer so the server can shut down
        self._cancel_jobs()
        await self._close()

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def url(self) -> str:
        return self.base_url + API_PATH

    # -- the API --------------------------------------------------------------------------------

    async def _api(self, request: web.Request) -> web.Response:
        params: dict[str, str] = dict(request.query)
        if request.method == "POST":
            params.update((k, v) for k, v in (await request.post()).items() if isinstance(v, str))
        command = params.get("command", "")
        call = {"command": command, "method": request.method,
                "params": {k: v for k, v in params.items() if k.lower() != "signature"},
                "status": None}
        self.calls.append(call)
        status, body, description = await self._answer(command, params)
        call["status"] = status
        headers = {"X-Description": description.encode("ascii", "replace").decode()} if description else {}
        return web.Response(status=status, body=orjson.dumps(body), headers=headers,
                            content_type="application/json", charset="utf-8")

    async def _answer(self, command: str, params: dict[str, str]) -> tuple[int, dict[str, Any], str | None]:
        key = f"{command.lower()}response" if command else "errorresponse"
        if lookup(params, "apiKey") != self.api_key or not verify(params, self._secret, _now()):
            return 401, {key: {"uuidList": [], "errorcode": 401, "errortext": AUTH_ERROR}}, AUTH_ERROR
        handler = self._handlers.get(command)
        if handler is None:
            error = ApiError(432, f"The given command:{command} does not exist or it is not "
                                  "available for user", 9999)
            return 432, {"errorresponse": error.body()}, error.errortext
        await self._delay(command)
        try:
            return 200, {key: self._dispatch(command, handler, _Args(command, params))}, None
        except ApiError as error:
            return error.errorcode, {key: error.body()}, error.errortext

    # -- the control endpoint -------------------------------------------------------------------

    async def _ctl_calls(self, request: web.Request) -> web.Response:
        return web.json_response(self.calls)

    async def _ctl_clear_calls(self, request: web.Request) -> web.Response:
        self.calls.clear()
        return web.json_response({"ok": True})

    async def _ctl_volumes(self, request: web.Request) -> web.Response:
        return web.json_response([self.volume_json(v) for v in self.volumes.values()])

    async def _ctl_jobs(self, request: web.Request) -> web.Response:
        return web.json_response([j.to_json() for j in self.jobs.values()])

    async def _ctl_job_log(self, request: web.Request) -> web.Response:
        return web.json_response(self.job_log())

    async def _ctl_hazards(self, request: web.Request) -> web.Response:
        return web.json_response(self.hazards)

    async def _ctl_add_vm(self, request: web.Request) -> web.Response:
        spec = await json_body(request, "name")
        return web.json_response({"id": self.add_vm(str(spec["name"]), spec.get("id"))})

    async def _ctl_pre_attach(self, request: web.Request) -> web.Response:
        spec = await json_body(request, "count")
        try:
            added = self.pre_attach(int(spec["count"]), spec.get("vm_id"))
        except ValueError as exc:
            raise web.HTTPBadRequest(text=str(exc)) from None
        return web.json_response([self.volume_json(v) for v in added])

    async def _ctl_fail(self, request: web.Request) -> web.Response:
        spec = await json_body(request, "command")
        self.fail(spec["command"], int(spec.get("count", 1)), int(spec.get("errorcode", 530)),
                  **({"errortext": spec["errortext"]} if "errortext" in spec else {}),
                  sync=bool(spec.get("sync", False)))
        return web.json_response({"ok": True})

    async def _ctl_latency(self, request: web.Request) -> web.Response:
        spec = await json_body(request, "command", "seconds")
        self.set_latency(spec["command"], float(spec["seconds"]))
        return web.json_response({"ok": True})

    async def _ctl_job_latency(self, request: web.Request) -> web.Response:
        spec = await json_body(request, "seconds")
        self.set_job_latency(float(spec["seconds"]), spec.get("command"))
        return web.json_response({"ok": True})

    async def _ctl_hang(self, request: web.Request) -> web.Response:
        self.hang((await json_body(request, "command"))["command"])
        return web.json_response({"ok": True})

    async def _ctl_release(self, request: web.Request) -> web.Response:
        spec = await json_body(request) if request.can_read_body else {}
        self.release(spec.get("command"))
        return web.json_response({"ok": True})

    async def _ctl_reset(self, request: web.Request) -> web.Response:
        self.reset_faults()
        return web.json_response({"ok": True})
