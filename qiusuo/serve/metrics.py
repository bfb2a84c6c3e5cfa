"""Prometheus metrics with vLLM's names under a `qiusuo:` prefix, in a registry per app.

vLLM's names (docs.vllm.ai, "Metrics") so that existing dashboards and autoscaling policies
(TTFT, queue length, KV usage) work by changing the prefix. Each app owns its
`CollectorRegistry`: no process-global state, so tests can build many apps in one process.

Latencies are measured on the event loop when outputs reach the request, i.e. as the client sees
them: TTFT from arrival (before templating and tokenization) to the first token, time per
output token as the mean gap between later tokens of a request, end-to-end to the last output.
"""

from __future__ import annotations

from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .outputs import EngineSnapshot

P = "qiusuo:"
API_SURFACES = ("openai_chat", "openai_completions", "ollama", "anthropic")
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0)  # fmt: skip
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                120.0, 240.0, 480.0)  # fmt: skip


class _EngineCollector:
    """Read at scrape time: the server's queue view, the engine's last snapshot and its restarts."""

    def __init__(self, model_name: str, queue_view: Callable[[], tuple[int, int]], engine: Callable[[], Any]):
        self.model_name, self.queue_view, self.engine = model_name, queue_view, engine

    def describe(self):
        return []  # generated at collect time; no duplicate-name checks needed

    def collect(self):
        running, waiting = self.queue_view()
        engine = self.engine()
        snap = engine.snapshot if engine is not None else EngineSnapshot()
        labels = ["model_name"]
        for name, doc, value in (
            ("num_requests_running", "Requests generating (their first token came).", running),
            ("num_requests_waiting", "Requests admitted and waiting for their first token.", waiting),
            ("kv_cache_usage_perc", "KV-cache usage: 1 means every block is in use.", snap.kv_cache_usage),
            ("gpu_cache_usage_perc", "Old vLLM name of kv_cache_usage_perc.", snap.kv_cache_usage),
        ):
            g = GaugeMetricFamily(P + name, doc, labels=labels)
            g.add_metric([self.model_name], value)
            yield g
        c = CounterMetricFamily(P + "num_preemptions", "Sequences preempted (recomputed later).", labels=labels)
        c.add_metric([self.model_name], snap.num_preemptions)
        yield c
        for name, doc, key in (
            ("grammar_time_seconds", "Time spent computing and applying grammar token masks "
             "(divide by grammar_tokens for the time per token).", "grammar_seconds"),
            ("grammar_tokens", "Tokens sampled under a grammar (structured outputs, forced tool calls).",
             "grammar_tokens"),
        ):
            c = CounterMetricFamily(P + name, doc, labels=labels)
            c.add_metric([self.model_name], snap.extra.get(key, 0))
            yield c
        spec = snap.extra.get("spec_decode")
        if spec is not None:  # MTP speculative decoding is on: vLLM's spec_decode counters
            for name, doc in (("num_drafts", "Speculative steps of a sequence with at least one draft token."),
                              ("num_draft_tokens", "Draft tokens proposed."),
                              ("num_accepted_tokens", "Draft tokens accepted by the target model.")):
                c = CounterMetricFamily(P + "spec_decode_" + name, doc, labels=labels)
                c.add_metric([self.model_name], spec[name])
                yield c
            c = CounterMetricFamily(P + "spec_decode_num_accepted_tokens_per_pos",
                                    "Draft tokens accepted, by position in the draft (0 = first).",
                                    labels=labels + ["position"])
            for pos, n in enumerate(spec["num_accepted_tokens_per_pos"]):
                c.add_metric([self.model_name, str(pos)], n)
            yield c
        c = CounterMetricFamily(P + "engine_restarts", "Engine processes respawned after dying.", labels=labels)
        c.add_metric([self.model_name], engine.num_restarts if engine is not None else 0)
        yield c


class ServerMetrics:
    def __init__(self, model_name: str, queue_view: Callable[[], tuple[int, int]], engine: Callable[[], Any]):
        """`engine()`: the engine client (its `snapshot` and `num_restarts`), or None while loading."""
        self.registry = CollectorRegistry(auto_describe=False)
        self.model_name = model_name
        lab = ["model_name"]
        r = self.registry
        self.ttft = Histogram(P + "time_to_first_token_seconds", "Time to first token.", lab,
                              buckets=_TTFT_BUCKETS, registry=r)
        self.tpot = Histogram(P + "time_per_output_token_seconds", "Mean time per output token after the first.",
                              lab, buckets=_TPOT_BUCKETS, registry=r)
        self.e2e = Histogram(P + "e2e_request_latency_seconds", "End-to-end request latency.", lab,
                             buckets=_E2E_BUCKETS, registry=r)
        self.prompt_tokens = Counter(P + "prompt_tokens", "Prompt tokens processed.", lab, registry=r)
        self.generation_tokens = Counter(P + "generation_tokens", "Tokens generated.", lab, registry=r)
        self.reasoning_tokens = Counter(P + "reasoning_tokens", "Generated tokens inside think blocks.", lab,
                                        registry=r)
        self.request_success = Counter(P + "request_success", "Requests finished, by finish reason.",
                                       lab + ["finished_reason"], registry=r)
        self.structured_requests = Counter(P + "structured_output_requests",
                                           "Requests with an output constraint, by kind (json, json_object, "
                                           "regex, choice, grammar).", lab + ["kind"], registry=r)
        self.tool_requests = Counter(P + "tool_call_requests", "Chat requests with tools, by tool_choice "
                                     "(auto, none, required, named).", lab + ["tool_choice"], registry=r)
        self.tool_calls = Counter(P + "tool_calls", "Tool calls returned to clients.", lab, registry=r)
        self.rejected = Counter(P + "request_rejected", "Requests refused with 429 (queue full).", lab, registry=r)
        self.api_requests = Counter(P + "api_requests", "Generation requests accepted for the engine, by API surface "
                                    "(openai_chat, openai_completions, ollama, anthropic).", lab + ["api"], registry=r)
        for m in (self.ttft, self.tpot, self.e2e, self.prompt_tokens, self.generation_tokens, self.reasoning_tokens,
                  self.rejected, self.tool_calls):
            m.labels(model_name)  # exported as 0 from the start, so rate() has a baseline
        for reason in ("stop", "length", "abort"):
            self.request_success.labels(model_name, reason)
        for api in API_SURFACES:
            self.api_requests.labels(model_name, api)
        r.register(_EngineCollector(model_name, queue_view, engine))

    def finished(self, reason: str) -> None:
        self.request_success.labels(self.model_name, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
