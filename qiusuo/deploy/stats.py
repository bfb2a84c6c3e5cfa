"""Deployment-wide figures from per-replica Prometheus counters: `read_counters` and `StatsBook`.

Each replica owns its metrics registry (qiusuo.serve.metrics), so no single `/metrics` scrape
sees a whole application: a request through Serve's proxy reaches one replica at random. Every
replica therefore reports its counters once a second to the dashboard app, and `StatsBook`
turns the reports into per-application totals and windowed rates.

Totals grow by each replica's *increase* since its previous report. A replica that dies takes
its counters with it, and a restarted one starts from zero under a new id; summing the raw
counters of the live replicas would make the totals drop and the rates go negative.
No ray import here, so the book is unit-tested without a cluster.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

P = "qiusuo:"
COUNTERS = ("requests", "prompt_tokens", "generation_tokens", "rejected", "ttft_sum", "ttft_count",
            "tpot_sum", "tpot_count", "e2e_sum", "e2e_count")  # fmt: skip


def read_counters(registry, model_name: str) -> tuple[dict[str, float], dict[str, float]]:
    """(counters, gauges) of one server's registry (qiusuo.serve.metrics names)."""
    lab = {"model_name": model_name}

    def value(name: str, **extra: str) -> float:
        v = registry.get_sample_value(P + name, {**lab, **extra})
        return float(v) if v is not None else 0.0

    counters = {
        "requests": sum(value("request_success_total", finished_reason=r) for r in ("stop", "length", "abort")),
        "prompt_tokens": value("prompt_tokens_total"),
        "generation_tokens": value("generation_tokens_total"),
        "rejected": value("request_rejected_total"),
    }
    for key, metric in (("ttft", "time_to_first_token_seconds"), ("tpot", "time_per_output_token_seconds"),
                        ("e2e", "e2e_request_latency_seconds")):
        counters[f"{key}_sum"] = value(metric + "_sum")
        counters[f"{key}_count"] = value(metric + "_count")
    gauges = {"running": value("num_requests_running"), "waiting": value("num_requests_waiting"),
              "kv_cache_usage": value("kv_cache_usage_perc")}
    return counters, gauges


def _rates(old: tuple[float, dict[str, float]], new: tuple[float, dict[str, float]]) -> dict[str, float | None]:
    """Rates and mean latencies between two (time, totals) points; latencies None without requests."""
    dt = max(new[0] - old[0], 1e-9)
    d = {k: new[1][k] - old[1][k] for k in COUNTERS}

    def mean(key: str) -> float | None:
        return d[f"{key}_sum"] / d[f"{key}_count"] if d[f"{key}_count"] > 0 else None

    return {"request_rate": d["requests"] / dt, "tokens_per_s": d["generation_tokens"] / dt,
            "prompt_tokens_per_s": d["prompt_tokens"] / dt, "ttft_s": mean("ttft"), "tpot_s": mean("tpot"),
            "e2e_s": mean("e2e")}


class _App:
    def __init__(self, name: str):
        self.name = name
        self.info: dict[str, Any] = {}  # model name, route prefix, autoscaling bounds: from the latest report
        self.totals = {k: 0.0 for k in COUNTERS}
        self.replicas: dict[str, dict[str, Any]] = {}  # replica id -> its latest report
        self.history: deque[tuple[float, dict[str, float]]] = deque()


class StatsBook:
    """Reports in, `snapshot()` out. `window_s`: the rates' averaging window; replicas silent for
    `stale_after_s` are listed as stale, and forgotten after `forget_after_s`."""

    def __init__(self, window_s: float = 10.0, history_s: float = 300.0, sample_every_s: float = 1.0,
                 stale_after_s: float = 5.0, forget_after_s: float = 20.0):
        if not 0 < sample_every_s <= window_s <= history_s:
            raise ValueError("need 0 < sample_every_s <= window_s <= history_s")
        self.window_s, self.history_s, self.sample_every_s = window_s, history_s, sample_every_s
        self.stale_after_s, self.forget_after_s = stale_after_s, forget_after_s
        self.apps: dict[str, _App] = {}

    def report(self, r: dict[str, Any], now: float | None = None) -> None:
        now = time.time() if now is None else now
        app = self.apps.setdefault(r["app"], _App(r["app"]))
        app.info = {k: r.get(k) for k in ("model", "route_prefix", "autoscaling")}
        previous = app.replicas.get(r["replica_id"], {}).get("counters", {})
        for k in COUNTERS:
            cur, prev = float(r["counters"].get(k, 0.0)), float(previous.get(k, 0.0))
            app.totals[k] += cur - prev if cur >= prev else cur  # a reset counter counts from zero
        app.replicas[r["replica_id"]] = {**r, "received": now}
        if not app.history or now - app.history[-1][0] >= self.sample_every_s:
            app.history.append((now, dict(app.totals)))
        else:  # keep the newest totals in the last sample so the rates see every report
            app.history[-1] = (app.history[-1][0], dict(app.totals))
        while app.history and app.history[0][0] < now - self.history_s:
            app.history.popleft()

    def forget(self, app_name: str) -> None:
        self.apps.pop(app_name, None)

    def snapshot(self, now: float | None = None, max_points: int = 120) -> dict[str, dict[str, Any]]:
        now = time.time() if now is None else now
        out = {}
        for name, app in self.apps.items():
            for rid in [rid for rid, r in app.replicas.items() if now - r["received"] > self.forget_after_s]:
                del app.replicas[rid]
            replicas = []
            for rid, r in sorted(app.replicas.items(), key=lambda kv: kv[1].get("started", 0)):
                fresh = now - r["received"] <= self.stale_after_s
                replicas.append({"replica_id": rid, "pid": r.get("pid"), "healthy": bool(r.get("healthy")) and fresh,
                                 "state": "reporting" if fresh else "stale", "last_report_s": round(now - r["received"], 2),
                                 "requests": r["counters"].get("requests", 0.0), **r.get("gauges", {})})
            live = [x for x in replicas if x["state"] == "reporting"]
            hist = list(app.history)
            current = (now, dict(app.totals))
            start = next((h for h in hist if h[0] >= now - self.window_s), hist[0] if hist else current)
            out[name] = {**app.info, "app": name, "totals": dict(app.totals), "replicas": replicas,
                         "num_reporting": len(live), "running": sum(x.get("running", 0) for x in live),
                         "waiting": sum(x.get("waiting", 0) for x in live),
                         **_rates(start, current), "series": self._series(hist, max_points)}
        return out

    def _series(self, hist: list[tuple[float, dict[str, float]]], max_points: int) -> list[dict[str, Any]]:
        """Rates over a sliding window at each history sample (for the live chart), oldest first."""
        points, j = [], 0
        for i in range(1, len(hist)):
            while j < i - 1 and hist[j + 1][0] <= hist[i][0] - self.window_s:
                j += 1
            points.append({"t": hist[i][0], **_rates(hist[j], hist[i])})
        return points[-max_points:]
