"""`qiusuo deploy NAME | status | stop [NAME]`: a model as an autoscaled Ray Serve application.

    qiusuo deploy tiny-moe:grpo --max-replicas 4      # starts a local Ray head on 127.0.0.1, returns when ready
    qiusuo deploy other --route-prefix /other         # a second model side by side
    qiusuo deploy status                              # applications, replicas, requests, latency, tokens/s
    qiusuo deploy stop tiny-moe-grpo                  # one application; `deploy stop` alone stops everything

Each model answers the OpenAI API at http://127.0.0.1:PORT/<route-prefix>/v1 and the dashboard
is at http://127.0.0.1:PORT/dashboard. The deployment outlives this command (a detached Ray head,
see qiusuo/deploy/head.py). Needs the Ray extra: pip install 'qiusuo[ray]'.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from .serve import add_api_key_flags, api_key


def _default(name: str):
    from qiusuo.deploy.config import DeployConfig

    return {f.name: f.default for f in dataclasses.fields(DeployConfig)}[name]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("deploy", help="deploy a model on Ray Serve (autoscaling, health checks, dashboard); "
                                      "`deploy status`, `deploy stop [NAME]`",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("words", nargs="+", metavar="NAME | status | stop [NAME]",
                   help="registry NAME[:TAG] or checkpoint directory to deploy; or `status`; or `stop [APP]`")
    p.add_argument("--port", type=int, default=None, help="HTTP port of Serve's proxy on 127.0.0.1 (default: the "
                                                          "running deployment's, else 8000)")
    p.add_argument("--address", default=None, help="join the Ray cluster at this GCS address instead of "
                                                    "starting a local head")
    p.add_argument("--name", default=None, help="Serve application name (default: from NAME)")
    p.add_argument("--served-model-name", default=None, help="the `model` clients send (default: NAME)")
    p.add_argument("--route-prefix", default=None, help="URL prefix of this model (default: /<app name>)")
    g = p.add_argument_group("autoscaling")
    g.add_argument("--min-replicas", type=int, default=_default("min_replicas"))
    g.add_argument("--max-replicas", type=int, default=_default("max_replicas"))
    g.add_argument("--target-ongoing-requests", type=float, default=_default("target_ongoing_requests"),
                   help="desired running + queued requests per replica")
    g.add_argument("--max-ongoing-requests", type=int, default=_default("max_ongoing_requests"),
                   help="per-replica cap enforced by Serve's proxy")
    g.add_argument("--upscale-delay", type=float, default=_default("upscale_delay_s"), help="seconds over target "
                   "before adding a replica")
    g.add_argument("--downscale-delay", type=float, default=_default("downscale_delay_s"),
                   help="seconds under target before removing one")
    g.add_argument("--look-back-period", type=float, default=_default("look_back_period_s"))
    g.add_argument("--metrics-interval", type=float, default=_default("metrics_interval_s"))
    g.add_argument("--health-check-period", type=float, default=_default("health_check_period_s"))
    g = p.add_argument_group("replicas and server")
    g.add_argument("--num-cpus", type=float, default=_default("num_cpus"), help="Ray CPUs reserved per replica")
    g.add_argument("--threads", type=int, default=_default("threads"), help="torch threads per replica")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    # --- quantization (DeployConfig.quantization) ---
    g.add_argument("--quantize", default=None, choices=["int8", "int8-dynamic", "int4"],
                   help="low-bit weights in every replica (qiusuo/model/quantize.py)")
    # --- end quantization ---
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--max-num-seqs", type=int, default=None)
    g.add_argument("--kv-cache-bytes", type=int, default=None)
    add_api_key_flags(g)
    g.add_argument("--max-queue", type=int, default=None, help="requests waiting for a first token per replica")
    g.add_argument("--max-tokens-cap", type=int, default=None)
    g.add_argument("--max-output-budget", type=int, default=None,
                   help="per request, n x max_tokens x (1 + top_logprobs); over it, 400")
    g.add_argument("--thinking-budget", type=int, default=None)
    g = p.add_argument_group("local Ray head (first deploy only)")
    g.add_argument("--ray-num-cpus", type=float, default=None, help="CPUs Ray may hand out (default: all)")
    g.add_argument("--object-store-mb", type=int, default=150)
    p.add_argument("--json", action="store_true", help="status: print the raw JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    verb = args.words[0]
    if verb == "status" and len(args.words) == 1:
        return status(args)
    if verb == "stop" and len(args.words) <= 2:
        from qiusuo.deploy.manager import stop

        print(stop(args.words[1] if len(args.words) == 2 else None))
        return 0
    if len(args.words) != 1:
        raise ValueError(f"unexpected arguments {' '.join(args.words[1:])!r}: use `deploy NAME`, `deploy status` "
                         "or `deploy stop [APP]`")
    return deploy(args)


def deploy(args) -> int:
    from qiusuo.registry import resolve_model
    from qiusuo.deploy.config import DeployConfig
    from qiusuo.deploy.manager import ModelLoadError
    from qiusuo.deploy.manager import deploy as run_deploy

    path = resolve_model(verb := args.words[0])  # unknown names fail here, listing the known ones
    server = {k: v for k, v in dict(api_key=api_key(args), max_queue=args.max_queue, max_tokens_cap=args.max_tokens_cap,
                                    max_output_budget=args.max_output_budget,
                                    default_thinking_budget=args.thinking_budget).items() if v is not None}
    engine = {k: v for k, v in dict(max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                                    kv_cache_bytes=args.kv_cache_bytes).items() if v is not None}
    config = DeployConfig(
        model=verb, model_path=str(path), app_name=args.name or "", served_model_name=args.served_model_name or "",
        route_prefix=args.route_prefix or "", min_replicas=args.min_replicas, max_replicas=args.max_replicas,
        target_ongoing_requests=args.target_ongoing_requests, max_ongoing_requests=args.max_ongoing_requests,
        upscale_delay_s=args.upscale_delay, downscale_delay_s=args.downscale_delay,
        look_back_period_s=args.look_back_period, metrics_interval_s=args.metrics_interval,
        health_check_period_s=args.health_check_period, num_cpus=args.num_cpus, threads=args.threads,
        dtype=args.dtype, quantization=args.quantize, server_options=server, engine_options=engine,
    )  # fmt: skip
    print(f"deploying {verb} ({path}) as application {config.app_name} ...", flush=True)
    try:
        info = run_deploy(config, port=args.port, address=args.address, num_cpus=args.ray_num_cpus,
                          object_store_mb=args.object_store_mb)
    except ModelLoadError as e:  # exit 1 with the load error, as `qiusuo serve`
        print(f"qiusuo deploy: error: {e}", file=sys.stderr, flush=True)
        return 1
    print(f"{info['model']} is served at {info['url']} (Ray {info['address']})\n"
          f"dashboard: {info['dashboard']}\nstop it with: qiusuo deploy stop {info['app']}")
    return 0


def status(args) -> int:
    from qiusuo.deploy.manager import fetch_status

    s = fetch_status()
    if s is None:
        print("nothing is deployed")
        return 0
    if args.json:
        print(json.dumps(s, indent=1))
        return 0
    print(f"Ray {s['address']} · http://127.0.0.1:{s['http_port']} · dashboard /dashboard")
    apps = s["applications"]
    if not apps:
        print("no applications")
    for a in apps:
        states = ", ".join(f"{v} {k}" for k, v in a.get("replica_states", {}).items()) or "none"
        auto = a.get("autoscaling") or {}
        print(f"\n{a['app']}  model={a.get('model', '?')}  {a['status']}  route={a.get('route_prefix', '?')}  "
              f"replicas: {states} (autoscaling {auto.get('min_replicas', '?')}-{auto.get('max_replicas', '?')})")
        if a.get("message"):
            print(f"  {a['message']}")
        t = a.get("totals", {})
        print(f"  requests {t.get('requests', 0):.0f} · {_f(a.get('request_rate'))} req/s · "
              f"{_f(a.get('tokens_per_s'))} tok/s · TTFT {_ms(a.get('ttft_s'))} · TPOT {_ms(a.get('tpot_s'))} · "
              f"e2e {_ms(a.get('e2e_s'))} · in flight {a.get('running', 0) + a.get('waiting', 0):.0f}")
        for r in a.get("replicas", []):
            print(f"  replica {r['replica_id']}  pid {r['pid']}  {'healthy' if r['healthy'] else r['state']}  "
                  f"requests {r['requests']:.0f}  running {r.get('running', 0):.0f}  waiting {r.get('waiting', 0):.0f}")
    return 0


def _f(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def _ms(x) -> str:
    return "-" if x is None else f"{x * 1000:.1f} ms"
