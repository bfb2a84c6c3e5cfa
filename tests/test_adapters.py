"""LoRA adapters through the chain: merged by one command, imported into the registry as a small model
that names its base, served several at a time on one base (batched with base requests), and written
as a llama.cpp LoRA GGUF. Oracles: the model with the adapter applied (ours and peft's), and each
adapter merged into a checkpoint of its own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import llama_cpp_model, randomize_, wait_healthy

from qiusuo.cli import main
from qiusuo.model import build_model, load_model, save_model
from qiusuo.model import lora

torch.set_num_threads(1)


def randomize_adapters_(model, seed, std=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora.lora_layers(model):
            m.lora_A.weight.copy_(torch.randn(m.lora_A.weight.shape, generator=g) * std)
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * std)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """A tiny dense base with its tokenizer and two adapters of different ranks and targets."""
    root = tmp_path_factory.mktemp("adapters")
    model, tokenizer = build_model("tiny-dense", seed=0, num_hidden_layers=2)
    randomize_(model, seed=3)
    base = save_model(model, tokenizer, root / "base")
    adapters = {}
    for name, r, alpha, targets, seed in (("sql", 4, 8.0, "all-linear", 11),
                                          ("poet", 2, 4.0, "q_proj,v_proj,down_proj", 12)):
        m, _ = load_model(base)
        lora.apply_lora(m, r=r, alpha=alpha, targets=targets)
        randomize_adapters_(m, seed)
        adapters[name] = lora.save_adapter(m, root / name, base_model_name_or_path=str(base))
    return root, base, adapters


IDS = torch.randint(3, 40, (2, 9), generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------ a. merge in one command
def test_export_merged_equals_the_model_with_its_adapter_and_peft_merge(chain, capsys):
    root, base, adapters = chain
    out = root / "merged-sql"
    assert main(["export", "merged", "--adapter", str(adapters["sql"]), "--out", str(out)]) == 0  # base from config
    assert "merged" in capsys.readouterr().out
    merged, _ = load_model(out)
    assert not lora.has_lora(merged)
    adapted, _ = load_model(base)
    lora.load_adapter(adapted, adapters["sql"])
    with torch.no_grad():
        ours = adapted(IDS)
        torch.testing.assert_close(merged(IDS), ours, atol=1e-5, rtol=0)
        assert (ours - load_model(base)[0](IDS)).abs().max() > 1e-2  # the adapter matters
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    peft_merged = peft.PeftModel.from_pretrained(hf, adapters["sql"]).merge_and_unload().eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_merged(IDS).logits, ours, atol=1e-5, rtol=0)
    hf_ours = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf_ours(IDS).logits, ours, atol=1e-5, rtol=0)


def test_export_merged_refuses_a_missing_base_and_a_mismatched_one(chain, tmp_path, capsys, make_checkpoint):
    root, base, adapters = chain
    bare = tmp_path / "bare"
    bare.mkdir()
    cfg = json.loads((adapters["poet"] / "adapter_config.json").read_text())
    (bare / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": None}))
    (bare / "adapter_model.safetensors").write_bytes((adapters["poet"] / "adapter_model.safetensors").read_bytes())
    assert main(["export", "merged", "--adapter", str(bare), "--out", str(tmp_path / "o")]) == 2
    assert "names no base model" in capsys.readouterr().err
    other = make_checkpoint("tiny-dense", hidden_size=48, num_hidden_layers=2)  # another shape
    assert main(["export", "merged", "--adapter", str(adapters["poet"]), "--model", str(other),
                 "--out", str(tmp_path / "o")]) == 2
    assert "the model needs" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ c. several adapters on one base, one batch
GREEDY = dict(temperature=0.0, max_tokens=12, ignore_eos=True)
# the same long prompt under every model (its first blocks are shareable: the prefix cache must keep
# each adapter's KV apart) and a shorter one
PROMPTS = ["12+34=46. 7*8=56. 99-9=90. 5+5=", "3*3="]


@pytest.fixture(scope="module")
def merged_dirs(chain):
    root, base, adapters = chain
    return {name: lora.merge_adapter(base, path, root / f"merged-{name}-engine") for name, path in adapters.items()}


def test_engine_batches_base_and_two_adapters_and_each_equals_its_merged_model(chain, merged_dirs):
    from qiusuo.engine import LLM, LoRARequest, SamplingParams

    root, base, adapters = chain
    llm = LLM(str(base), lora_modules={k: str(v) for k, v in adapters.items()}, num_threads=1)
    engine = llm.llm_engine
    assert engine.list_loras() == ["sql", "poet"]
    seen = []
    prepare = engine.loras.prepare
    engine.loras.prepare = lambda ids: (seen.append(sorted(set(ids))), prepare(ids))  # record, then run
    models = [None, "sql", "poet"]
    prompts = [p for p in PROMPTS for _ in models]
    which = [m for _ in PROMPTS for m in models]
    outs = llm.generate(prompts, SamplingParams(**GREEDY), lora_request=which)
    assert [0, 1, 2] in seen  # one forward held base rows and both adapters' rows
    got = {(p, m): list(o.outputs[0].token_ids) for p, m, o in zip(prompts, which, outs)}
    for m in models:
        alone = LLM(str(base if m is None else merged_dirs[m]), num_threads=1)
        for p, o in zip(PROMPTS, alone.generate(PROMPTS, SamplingParams(**GREEDY))):
            assert got[(p, m)] == list(o.outputs[0].token_ids), (p, m)
    assert len({tuple(got[(PROMPTS[0], m)]) for m in models}) == 3  # three different models
    # vLLM's LoRARequest loads a new adapter on first use; an unknown name without a path is refused
    again = llm.generate(PROMPTS[1], SamplingParams(**GREEDY),
                         lora_request=LoRARequest("poet2", 7, str(adapters["poet"])))
    assert list(again[0].outputs[0].token_ids) == got[(PROMPTS[1], "poet")]
    with pytest.raises(ValueError, match="no LoRA adapter named 'nope'"):
        llm.generate("1+1=", SamplingParams(**GREEDY), lora_request="nope")
    assert not engine.has_unfinished_requests()


def test_serving_adapters_refuse_what_they_cannot_apply(chain, tmp_path, make_checkpoint):
    from qiusuo.engine import LLM, EngineConfig

    root, base, adapters = chain
    with pytest.raises(ValueError, match="compile"):
        EngineConfig(compile=True, lora_modules={"sql": str(adapters["sql"])})
    with pytest.raises(ValueError, match="the model needs"):  # another base's shapes
        LLM(str(make_checkpoint("tiny-dense", hidden_size=64, num_hidden_layers=2)),
            lora_modules={"sql": str(adapters["sql"])})
    with pytest.raises(FileNotFoundError, match="not a LoRA adapter"):
        LLM(str(base), lora_modules={"x": str(tmp_path)})
    with pytest.raises(ValueError, match="quantized weights"):
        LLM(str(base), quantization="int8", lora_modules={"sql": str(adapters["sql"])})
    live, tok = load_model(base)
    with pytest.raises(ValueError, match="live module"):
        LLM(live, tok, lora_modules={"sql": str(adapters["sql"])})
    with pytest.raises(ValueError, match="live module"):
        LLM(live, tok).generate("1+1=", lora_request="sql")
    moe = make_checkpoint("tiny-moe", num_hidden_layers=2)
    m, _ = load_model(moe)
    lora.apply_lora(m, r=2, alpha=2, targets="kv_b_proj")
    lora.save_adapter(m, tmp_path / "mla")
    with pytest.raises(ValueError, match="absorbed decode"):
        LLM(str(moe), lora_modules={"mla": str(tmp_path / "mla")})


def test_serve_lora_modules_through_the_openai_client(chain, merged_dirs, tmp_path):
    """`qiusuo serve --lora-modules` as a user runs it (its own engine process): requests for the base and two
    adapters sent at once each get the greedy tokens of that model served alone; /v1/models lists the
    adapters under their base; an unknown adapter is a 404 in OpenAI's error shape."""
    import concurrent.futures
    import os
    import signal
    import socket
    import subprocess
    import sys
    from pathlib import Path

    import httpx

    openai = pytest.importorskip("openai")
    from qiusuo.engine import LLM, SamplingParams

    root, base, adapters = chain
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # `tiny:sql` is served from the registry (its entry gives /api/tags a size), `poet` from its directory
    from qiusuo.registry import Registry

    registry = Registry(tmp_path / "home")
    registry.import_dir(base, "tiny")
    sql = registry.import_dir(adapters["sql"], "tiny:sql", base="tiny")
    env = {**os.environ, "QIUSUO_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "qiusuo", "serve", "--model", str(base), "--served-model-name",
                             "tiny", "--port", str(port), "--threads", "1", "--log-level", "warning",
                             "--lora-modules", "tiny:sql=tiny:sql", f"poet={adapters['poet']}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url)
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        listed = {m.id: m for m in client.models.list().data}
        assert set(listed) == {"tiny", "tiny:sql", "poet"}
        assert listed["poet"].model_extra["parent"] == "tiny" and "parent" not in listed["tiny"].model_extra
        models = ["tiny", "tiny:sql", "poet"]
        jobs = [(m, p) for p in PROMPTS for m in models]

        def complete(job):
            m, p = job
            r = client.completions.create(model=m, prompt=p, temperature=0, max_tokens=GREEDY["max_tokens"],
                                          extra_body={"ignore_eos": True})
            return r.choices[0].text

        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
            served = dict(zip(jobs, pool.map(complete, jobs)))
        alone = {"tiny": base, "tiny:sql": merged_dirs["sql"], "poet": merged_dirs["poet"]}
        for m in models:
            outs = LLM(str(alone[m]), num_threads=1).generate(PROMPTS, SamplingParams(**GREEDY))
            for p, o in zip(PROMPTS, outs):
                assert served[(m, p)] == o.outputs[0].text, (m, p)
        # the Ollama and Anthropic routes reach the adapters by the same names, through the same chat route
        msg = [{"role": "user", "content": "7*8="}]
        chat = {m: client.chat.completions.create(model=m, messages=msg, temperature=0, max_tokens=8)
                .choices[0].message.content for m in models}
        assert len(set(chat.values())) == 3
        opts = {"temperature": 0, "num_predict": 8}
        for m in ("tiny:sql", "poet"):
            r = httpx.post(url + "/api/chat", json={"model": m, "messages": msg, "stream": False, "options": opts})
            assert r.status_code == 200 and r.json()["message"]["content"] == chat[m], r.text
        r = httpx.post(url + "/v1/messages", json={"model": "poet", "max_tokens": 8, "temperature": 0, "messages": msg})
        assert r.status_code == 200 and r.json()["content"][-1]["text"] == chat["poet"], r.text
        assert httpx.post(url + "/api/chat", json={"model": "tiny:nope", "messages": msg}).status_code == 404
        with pytest.raises(openai.NotFoundError) as e:
            client.chat.completions.create(model="tiny:nope", messages=[{"role": "user", "content": "hi"}])
        err = e.value.response.json()["error"]
        assert err["code"] == "model_not_found" and err["param"] == "model" and "tiny:sql" in err["message"]
        # Ollama's /api/tags lists the adapters too, the base as their parent, by names its routes take
        ollama = pytest.importorskip("ollama")
        o = ollama.Client(host=url, timeout=60)
        tags = {m.model: m for m in o.list().models}
        assert list(tags) == ["tiny:latest", "tiny:sql", "poet:latest"]
        assert tags["tiny:latest"].details.parent_model == ""
        assert tags["tiny:sql"].details.parent_model == tags["poet:latest"].details.parent_model == "tiny:latest"
        assert tags["poet:latest"].details.family == tags["tiny:latest"].details.family
        assert len({m.digest for m in tags.values()}) == 3
        assert tags["tiny:sql"].size == sql.size > 0 and tags["poet:latest"].size == 0  # poet: not in the registry
        assert o.chat(model="poet:latest", messages=msg, options=opts).message.content == chat["poet"]
        # /api/ps: the adapters are loaded on the base; /api/show: an adapter's Modelfile is FROM + ADAPTER
        assert [m.model for m in o.ps().models] == list(tags)
        shown = o.show("tiny:sql")
        assert shown.modelfile == "FROM tiny:latest\nADAPTER tiny:sql\n"
        assert shown.details.parent_model == "tiny:latest"
        assert o.show("tiny").modelfile == "FROM tiny:latest\n" and o.show("tiny").details.parent_model == ""
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0


# ------------------------------------------------------------------ b. the registry: an adapter names its base
def test_models_import_stores_an_adapter_as_a_small_model_naming_its_base(chain, tmp_path, monkeypatch, capsys,
                                                                          merged_dirs):
    from qiusuo.registry import Registry, resolve_adapter, resolve_model

    root, base, adapters = chain
    monkeypatch.setenv("QIUSUO_HOME", str(tmp_path / "home"))
    assert main(["models", "import", str(base), "--name", "tiny"]) == 0
    # the adapter's config names the base by path: not a registry name, refused with the fix
    assert main(["models", "import", str(adapters["sql"]), "--name", "tiny:sql"]) == 2
    err = capsys.readouterr().err
    assert "is not a model in this registry" in err and "--base NAME" in err
    assert main(["models", "import", str(adapters["sql"]), "--name", "tiny:sql", "--base", "tiny"]) == 0
    assert "a LoRA adapter of tiny:latest" in capsys.readouterr().out
    registry = Registry()
    entry, full = registry.show("tiny:sql"), registry.show("tiny")
    assert entry.adapter_of == "tiny:latest" and full.adapter_of is None
    assert sorted(f.path for f in entry.files) == ["adapter_config.json", "adapter_model.safetensors"]
    assert not {f.digest for f in entry.files} & {f.digest for f in full.files}  # only the adapter's own blobs
    assert entry.size < full.size / 4
    assert main(["models", "list"]) == 0 and "LoRA r=4" in capsys.readouterr().out
    # a registry adapter is no --model; it is served with --lora-modules and merged by name
    with pytest.raises(ValueError, match="LoRA adapter of tiny:latest"):
        resolve_model("tiny:sql")
    assert (resolve_adapter("tiny:sql") / "adapter_config.json").is_file()
    out = tmp_path / "merged"
    assert main(["export", "merged", "--adapter", "tiny:sql", "--out", str(out)]) == 0  # base from the registry
    with torch.no_grad():
        torch.testing.assert_close(load_model(out)[0](IDS), load_model(merged_dirs["sql"])[0](IDS), atol=0, rtol=0)
    # the base cannot go while an adapter names it
    assert main(["models", "rm", "tiny"]) == 2
    assert "base of the adapter(s) tiny:sql" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["outside", "missing", "adapter-base", "other-shape", "bad-keys", "symlink"])
def test_models_import_refuses_hostile_adapters(chain, tmp_path, monkeypatch, capsys, make_checkpoint, case):
    import os
    import shutil

    from qiusuo.registry import Registry

    root, base, adapters = chain
    monkeypatch.setenv("QIUSUO_HOME", str(tmp_path / "home"))
    assert main(["models", "import", str(base), "--name", "tiny"]) == 0
    evil = tmp_path / "evil"
    shutil.copytree(adapters["poet"], evil)
    cfg = json.loads((evil / "adapter_config.json").read_text())
    args = ["models", "import", str(evil), "--name", "evil"]
    if case == "outside":  # a base "name" that is a path out of the registry: never opened
        (evil / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "../../../etc"}))
        expect = "is not a model in this registry"
    elif case == "missing":
        args += ["--base", "nope:v1"]
        expect = "'nope:v1' (--base) is not a model in this registry"
    elif case == "adapter-base":
        assert main(["models", "import", str(adapters["sql"]), "--name", "tiny:sql", "--base", "tiny"]) == 0
        args += ["--base", "tiny:sql"]
        expect = "is itself an adapter"
    elif case == "other-shape":
        assert main(["models", "import", str(make_checkpoint("tiny-dense", hidden_size=64, num_hidden_layers=2)),
                     "--name", "narrow"]) == 0
        args += ["--base", "narrow"]
        expect = "is it the adapter of another model"
    elif case == "bad-keys":
        from safetensors.torch import save_file

        save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 8)},
                  evil / "adapter_model.safetensors")
        args += ["--base", "tiny"]
        expect = "lora_A.weight and .lora_B.weight pairs"
    else:  # the weights a symlink to a file elsewhere
        (evil / "adapter_model.safetensors").unlink()
        os.symlink(adapters["poet"] / "adapter_model.safetensors", evil / "adapter_model.safetensors")
        args += ["--base", "tiny"]
        expect = "has no regular file adapter_model.safetensors"
    capsys.readouterr()
    assert main(args) == 2
    assert expect in capsys.readouterr().err
    assert [m.ref for m in Registry().list() if m.name == "evil"] == []


# ------------------------------------------------------------------ d. a LoRA adapter GGUF for llama.cpp
GGUF_CASES = {
    "qwen2": (dict(preset="tiny-dense"), "all-linear"),
    "llama": (dict(preset="tiny-dense", model_type="llama"), "all-linear"),  # q/k rows permuted into pairs
    # llama.cpp's deepseek2 applies adapters to attn_output and the FFNs only (the rest is refused, below)
    "deepseek2": (dict(preset="tiny-moe", q_lora_rank=32), "o_proj,gate_proj,up_proj,down_proj"),
}


@pytest.mark.parametrize("case", list(GGUF_CASES))
def test_llama_cpp_applies_our_lora_gguf_on_the_exported_base(tmp_path, case, capsys):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    from qiusuo.engine import LLM, SamplingParams

    overrides, targets = GGUF_CASES[case]
    overrides = dict(overrides)
    model, tok = build_model(overrides.pop("preset"), seed=0, num_hidden_layers=2, **overrides)
    randomize_(model, seed=5)
    base = save_model(model, tok, tmp_path / "base")
    lora.apply_lora(model, r=4, alpha=8, targets=targets)
    randomize_adapters_(model, seed=6)
    adapter = lora.save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(base))
    assert main(["export", "gguf", "--model", str(base), "--out", str(tmp_path / "base.gguf"), "--dtype", "f32"]) == 0
    assert main(["export", "gguf", "--adapter", str(adapter), "--out", str(tmp_path / "lora.gguf")]) == 0
    r = gguf.GGUFReader(tmp_path / "lora.gguf")
    assert r.fields["general.type"].contents() == "adapter" and r.fields["adapter.type"].contents() == "lora"
    assert r.fields["adapter.lora.alpha"].contents() == 8.0
    names = {t.name for t in r.tensors}
    assert "blk.0.attn_output.weight.lora_a" in names and "blk.1.attn_output.weight.lora_b" in names
    assert len(names) == 2 * len(model.lora_spec.module_names)
    llm = llama_cpp_model(tmp_path / "base.gguf", lora_path=str(tmp_path / "lora.gguf"), n_ctx=128,
                          n_threads=1, n_batch=128, logits_all=True, type_k=0, type_v=0, verbose=False, seed=0)
    ids = [tok.bos_token_id] + tok.encode("12+34=46. the cat sat")
    llm.eval(ids)
    theirs = np.asarray(llm.scores[: len(ids)])
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].numpy()
        base_logits = load_model(base)[0](torch.tensor([ids]))[0].numpy()
    scale = np.abs(ours).max()
    assert np.abs(theirs - ours).max() <= 1e-4 * scale, np.abs(theirs - ours).max()
    assert np.abs(base_logits - ours).max() > 100 * np.abs(theirs - ours).max()  # the adapter is what matched
    # greedy tokens: llama.cpp with --lora equals qiusuo serving the adapter on the same base
    prompts = [[tok.bos_token_id] + tok.encode(t) for t in ("12+34=", "the cat", "7*8=5")]
    served = LLM(str(base), lora_modules={"a": str(adapter)}, num_threads=1).generate(
        prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), lora_request="a")
    for p, o in zip(prompts, served):
        gen = []
        for t in llm.generate(p, temp=0.0, top_k=1, reset=True):
            gen.append(int(t))
            if len(gen) == 16:
                break
        assert gen == list(o.outputs[0].token_ids), tok.decode(p)


@pytest.mark.parametrize("targets", ["kv_b_proj,o_proj", "q_proj", "kv_a_proj_with_mqa"])
def test_lora_gguf_refuses_adapters_llama_cpp_would_drop(tmp_path, capsys, targets):
    """llama.cpp's deepseek2 multiplies the MLA projections but o_proj without adapters: an adapter there would be
    silently ignored (measured: logits unchanged), so it is refused with the fix."""
    pytest.importorskip("gguf")
    model, tok = build_model("tiny-moe", seed=0, num_hidden_layers=2)
    base = save_model(model, tok, tmp_path / "base")
    lora.apply_lora(model, r=2, alpha=2, targets=targets)
    adapter = lora.save_adapter(model, tmp_path / "adapter")
    assert main(["export", "gguf", "--model", str(base), "--adapter", str(adapter), "--out",
                 str(tmp_path / "a.gguf")]) == 2
    err = capsys.readouterr().err
    assert "applies adapters only to attn_output and the FFNs" in err and "qiusuo export merged" in err
    assert not (tmp_path / "a.gguf").exists()


def test_deploy_replica_engine_serves_the_lora_modules(chain):
    """`qiusuo deploy --lora-modules` puts the adapters in the replicas' engine options; a replica's engine loads
    them (in a child process: importing the replica imports Ray, as tests/test_deploy.py explains)."""
    import os
    import subprocess
    import sys

    from qiusuo.cli import build_parser
    from qiusuo.cli.flags import engine_options
    from qiusuo.cli.serve import lora_options

    root, base, adapters = chain
    args = build_parser().parse_args(["deploy", str(base), "--lora-modules", f"sql={adapters['sql']}"])
    engine = engine_options(args, skip=("device", "num_threads"))
    lora_options(args, engine, "m")
    assert engine["lora_modules"] == {"sql": str(adapters["sql"])}
    code = ("import json, sys\n"
            "from qiusuo.deploy.config import DeployConfig\n"
            "from qiusuo.deploy.replica import load_engine\n"
            "options = json.loads(sys.argv[2])\n"
            "engine = load_engine(DeployConfig(model='m', model_path=sys.argv[1], engine_options=options))\n"
            "assert engine.list_loras() == ['sql'], engine.list_loras()\n")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", code, str(base), json.dumps(engine)], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_serve_lora_modules_flag_errors_and_registry_adapters(chain, tmp_path, monkeypatch, capsys):
    from qiusuo.cli.serve import lora_modules

    root, base, adapters = chain
    monkeypatch.setenv("QIUSUO_HOME", str(tmp_path / "home"))
    for specs, message in ((["sql"], "write NAME=PATH"), ([f"a={adapters['sql']}", f"a={adapters['poet']}"], "twice"),
                           ([f"tiny={adapters['sql']}"], "twice"), ([f"x={tmp_path}"], "not a LoRA adapter"),
                           (["x=nope:v1"], "neither an adapter directory")):
        assert main(["serve", "--model", str(base), "--served-model-name", "tiny", "--port", "1",
                     "--lora-modules", *specs]) == 2  # refused before loading anything or binding the port
        assert message in capsys.readouterr().err, specs
    assert main(["models", "import", str(base), "--name", "tiny"]) == 0
    assert main(["models", "import", str(adapters["sql"]), "--name", "tiny:sql", "--base", "tiny"]) == 0
    resolved = lora_modules(["tiny:sql=tiny:sql"], "tiny")  # a registry adapter, materialized
    assert (Path(resolved["tiny:sql"]) / "adapter_model.safetensors").is_file()
    assert main(["serve", "--model", "tiny", "--port", "1", "--lora-modules", "a=tiny"]) == 2
    assert "is a full model, not a LoRA adapter" in capsys.readouterr().err
