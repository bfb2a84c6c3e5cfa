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
import json
import sys

from .flags import add_config_flags, add_engine_flags, config_kwargs, engine_options
from .serve import SERVER_SKIP, add_api_key_flags, add_lora_flag, api_key, lora_options

# DeployConfig fields without a flag: NAME is the positional word, its path is resolved from it, and
# the server and engine options have flags of their own (ServerConfig's and EngineConfig's)
DEPLOY_SKIP = ("model", "model_path", "server_options", "engine_options", "api_key_file")
# EngineConfig fields a replica does not take: it runs on the CPUs Ray reserves (--num-cpus), with
# DeployConfig's --threads (default 1: replicas share the cores)
ENGINE_SKIP = ("device", "num_threads")


def register(sub: argparse._SubParsersAction) -> None:
    from qiusuo.deploy.config import DeployConfig  # light: no ray, no torch
    from qiusuo.serve.config import ServerConfig

    p = sub.add_parser("deploy", help="deploy a model on Ray Serve (autoscaling, health checks, dashboard); "
                                      "`deploy status`, `deploy stop [NAME]`",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("words", nargs="+", metavar="NAME | status | stop [NAME]",
                   help="registry NAME[:TAG] or checkpoint directory to deploy; or `status`; or `stop [APP]`")
    p.add_argument("--port", type=int, default=None, help="HTTP port of Serve's proxy on 127.0.0.1 (default: the "
                                                          "running deployment's, else 8000)")
    p.add_argument("--address", default=None, help="join the Ray cluster at this GCS address instead of "
                                                    "starting a local head")
    add_config_flags(p.add_argument_group("application, autoscaling and replicas"), DeployConfig, skip=DEPLOY_SKIP)
    g = p.add_argument_group("server (per replica)")
    add_api_key_flags(g)
    add_config_flags(g, ServerConfig, skip=SERVER_SKIP)
    g = p.add_argument_group("engine (per replica)")
    add_engine_flags(g, skip=ENGINE_SKIP)
    add_lora_flag(g)
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
    from qiusuo.deploy.config import DeployConfig
    from qiusuo.deploy.manager import ModelLoadError
    from qiusuo.deploy.manager import deploy as run_deploy
    from qiusuo.registry import resolve_model
    from qiusuo.serve.config import ServerConfig

    verb = args.words[0]
    engine = engine_options(args, skip=ENGINE_SKIP)  # a bad engine or server flag fails first (exit 2)
    lora_options(args, engine, args.served_model_name or verb)  # adapter paths travel like model_path
    # the key travels to the replicas in a 0600 file (deploy()), never in the config Ray keeps
    server = config_kwargs(ServerConfig, args, skip=SERVER_SKIP)
    key = api_key(args)
    ServerConfig(served_model_name=args.served_model_name or verb, api_key=key, **server)
    path = resolve_model(verb)  # unknown names fail here, listing the known ones
    config = DeployConfig(model=verb, model_path=str(path), **config_kwargs(DeployConfig, args, skip=DEPLOY_SKIP),
                          server_options=server, engine_options=engine)
    print(f"deploying {verb} ({path}) as application {config.app_name} ...", flush=True)
    try:
        info = run_deploy(config, port=args.port, address=args.address, num_cpus=args.ray_num_cpus,
                          object_store_mb=args.object_store_mb, api_key=key)
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
