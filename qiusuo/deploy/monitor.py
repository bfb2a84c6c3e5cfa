"""`Monitor`: the dashboard application (`/dashboard`), fed by the model replicas' reports.

One replica, no CPU reserved. It keeps a `StatsBook` of the reports and answers:

    GET /dashboard                  the page (static HTML + JS from qiusuo/deploy/static, no build step)
    GET /dashboard/static/NAME      its script and stylesheet
    GET /dashboard/api/status       JSON: every application with its Serve status, replica counts,
                                    reporting replicas (pid, health, load), totals, windowed rates,
                                    TTFT/TPOT and a short history for the chart

`qiusuo deploy status` prints the same JSON as a table. Serve's own view (application and
replica states) comes from `serve.status()`; the figures come from the replicas' reports.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve

from .config import DASHBOARD_APP
from .stats import StatsBook

STATIC = Path(__file__).with_name("static")
_STATIC_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}


def serve_status() -> dict[str, dict[str, Any]]:
    """Serve's view of every application: status, message and replica states of its deployments."""
    apps = {}
    for name, app in serve.status().applications.items():
        states: dict[str, int] = {}
        deployments = {}
        for dname, d in app.deployments.items():
            deployments[dname] = {"status": str(getattr(d.status, "value", d.status)), "message": d.message,
                                  "replica_states": {str(getattr(k, "value", k)): v for k, v in d.replica_states.items()}}
            for k, v in deployments[dname]["replica_states"].items():
                states[k] = states.get(k, 0) + v
        apps[name] = {"status": str(getattr(app.status, "value", app.status)), "message": app.message,
                      "replica_states": states, "deployments": deployments}
    return apps


@serve.deployment(name="Monitor", num_replicas=1, max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Monitor:
    def __init__(self, http_port: int, status_cache_s: float = 0.5):
        self.http_port = http_port
        self.book = StatsBook()
        self.status_cache_s = status_cache_s
        self._serve_status: tuple[float, dict[str, Any]] = (0.0, {})
        self._lock = asyncio.Lock()

    def report(self, payload: dict[str, Any]) -> None:
        self.book.report(payload)

    async def status(self) -> dict[str, Any]:
        async with self._lock:  # one serve.status() call at a time, shared by concurrent pollers
            if time.monotonic() - self._serve_status[0] > self.status_cache_s:
                self._serve_status = (time.monotonic(), await asyncio.to_thread(serve_status))
        serve_apps = self._serve_status[1]
        figures = self.book.snapshot()
        for name in [n for n in figures if n not in serve_apps]:  # deleted with `deploy stop NAME`
            self.book.forget(name)
            del figures[name]
        apps = []
        for name, s in sorted(serve_apps.items()):
            if name == DASHBOARD_APP:
                continue
            f = figures.get(name, {"app": name, "replicas": [], "series": []})
            apps.append({**f, "app": name, "status": s["status"], "message": s["message"],
                         "replica_states": s["replica_states"], "num_replicas": s["replica_states"].get("RUNNING", 0)})
        return {"time": time.time(), "http_port": self.http_port, "applications": apps}

    def __serve_build_asgi_app__(self):
        return build_dashboard_app(self)


def build_dashboard_app(monitor: "Monitor") -> FastAPI:
    """The routes, at module level: FastAPI resolves their annotations (`Request`) in this module's
    globals, which a function pickled by value into the replica would not carry."""
    app = FastAPI(title="qiusuo dashboard", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/")
    async def page(request: Request):
        root = request.scope.get("root_path", "")
        html = (STATIC / "dashboard.html").read_text().replace("__ROOT__", root)
        return HTMLResponse(html, headers={"cache-control": "no-store"})

    @app.get("/static/{name}")
    async def static(name: str):
        path = STATIC / name
        if path.suffix not in _STATIC_TYPES or path.name != name or not path.is_file():
            return JSONResponse({"error": {"message": f"no static file {name!r}", "code": "not_found"}},
                                status_code=404)
        return Response(path.read_bytes(), media_type=_STATIC_TYPES[path.suffix])

    @app.get("/api/status")
    async def api_status():
        return JSONResponse(await monitor.status(), headers={"cache-control": "no-store"})

    return app
