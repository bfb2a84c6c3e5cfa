"""The registry spec: import/list/show/tag/rm round trip, content-addressed dedupe, blobs freed only
when unused, materialized checkpoints load with identical weights, corrupt blobs are reported and
never served, clear errors for unknown and bad names, concurrent imports keep a consistent index,
and every `qiusuo models` verb through the CLI."""

from __future__ import annotations

import json
import multiprocessing
import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from qiusuo import cli
from qiusuo.registry import (
    CorruptBlobError, Registry, RegistryError, UnknownModelError, count_parameters, parse_name, resolve_model,
)
from qiusuo.registry import index as registry_index


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    h = tmp_path / "qiusuo_home"
    monkeypatch.setenv("QIUSUO_HOME", str(h))
    return h


def fake_checkpoint(path: Path, seed: int, *, tokenizer: str = "shared tokenizer", meta: dict | None = None) -> Path:
    """A checkpoint-shaped directory without torch: config.json, a small safetensors file, a tokenizer
    file whose content is shared across seeds (so dedupe has something to find), and qiusuo.json."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}))
    rng = np.random.default_rng(seed)
    save_file({"model.embed_tokens.weight": rng.standard_normal((16, 8)).astype(np.float32),
               "model.norm.weight": np.ones(8, dtype=np.float32)}, str(path / "model.safetensors"))
    (path / "tokenizer.json").write_text(tokenizer)
    (path / "qiusuo.json").write_text(json.dumps(meta or {"stage": "test"}))
    return path


@pytest.fixture(scope="module")
def tiny_checkpoint(make_checkpoint) -> Path:
    return make_checkpoint(metadata={"stage": "grpo", "run_dir": "runs/grpo-1", "eval": {"pass@1": 0.25}})


def referenced_digests(reg: Registry) -> set[str]:
    return {f.digest for m in reg.list() for f in m.files}


def corrupt(reg: Registry, digest: str) -> None:
    blob = reg.blobs.path(digest)
    os.chmod(blob, 0o644)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))


# ---------------------------------------------------------------------- names
@pytest.mark.parametrize("ref, expected", [
    ("tiny", ("tiny", "latest")), ("tiny:v1", ("tiny", "v1")), ("org/tiny-moe.v2:grpo_3", ("org/tiny-moe.v2", "grpo_3")),
])
def test_parse_name(ref, expected):
    assert parse_name(ref) == expected


@pytest.mark.parametrize("ref", ["bad name", "a:b:c", "../x", "/abs", "a//b", "", ":v1", "a:", "a@b", "a/.hidden", "-x"])
def test_bad_names_are_rejected_with_the_rule(home, ref):
    with pytest.raises(RegistryError, match="NAME\\[:TAG\\]"):
        parse_name(ref)
    with pytest.raises(ValueError):
        Registry().import_dir(fake_checkpoint(home.parent / "c", 0), ref)


# ---------------------------------------------------------------------- round trip
def test_import_list_show_tag_rm_round_trip(home, tiny_checkpoint):
    reg = Registry()
    assert reg.list() == [] and not home.exists()  # reading an empty registry creates nothing
    info = reg.import_dir(tiny_checkpoint, "tiny")
    assert info.ref == "tiny:latest"
    assert info.architecture == "Qwen2ForCausalLM" and info.model_type == "qwen2"
    from qiusuo.model import load_model

    model, _ = load_model(tiny_checkpoint)
    assert info.parameters == model.num_parameters()
    assert info.source_run == "runs/grpo-1" and info.eval_score == 0.25  # from qiusuo.json
    assert info.metadata["stage"] == "grpo"
    assert {f.path for f in info.files} == {p.name for p in tiny_checkpoint.iterdir()}
    assert info.size == sum(p.stat().st_size for p in tiny_checkpoint.iterdir())

    reg.tag("tiny", "tiny:v1")
    assert [m.ref for m in reg.list()] == ["tiny:latest", "tiny:v1"]
    assert reg.show("tiny:v1").files == info.files
    reg.set_eval_score("tiny:v1", 0.5)
    assert reg.show("tiny:v1").eval_score == 0.5 and reg.show("tiny").eval_score == 0.25

    reg.remove("tiny")
    assert [m.ref for m in reg.list()] == ["tiny:v1"]
    reg.remove("tiny:v1")
    assert reg.list() == [] and reg.blobs.digests() == set()


def test_arguments_override_qiusuo_json(home, tmp_path):
    ckpt = fake_checkpoint(tmp_path / "c", 0, meta={"run_dir": "runs/a", "eval": 0.1})
    info = Registry().import_dir(ckpt, "m", source_run="runs/b", eval_score=0.9, metadata={"note": "x"})
    assert (info.source_run, info.eval_score, info.metadata) == ("runs/b", 0.9, {"run_dir": "runs/a", "eval": 0.1, "note": "x"})


def test_parameter_count_from_headers_matches_the_model_moe_and_shards(tmp_path):
    from qiusuo.model import build_model, save_model

    model, tok = build_model("tiny-moe", seed=0)  # MTP copies and router bias must not be counted
    path = save_model(model, tok, tmp_path / "moe", max_shard_bytes=1_000_000)
    shards = sorted(path.glob("*.safetensors"))
    assert len(shards) > 1
    assert count_parameters(shards) == model.num_parameters()


# ---------------------------------------------------------------------- blobs
def test_identical_files_are_stored_once(home, tmp_path):
    reg = Registry()
    a = fake_checkpoint(tmp_path / "a", seed=0)
    b = fake_checkpoint(tmp_path / "b", seed=1)  # different weights, same config/tokenizer/qiusuo.json
    reg.import_dir(a, "a")
    reg.import_dir(a, "a-again")
    assert len(reg.blobs.digests()) == 4
    reg.import_dir(b, "b")
    assert len(reg.blobs.digests()) == 5  # only b's weights are new
    assert reg.blobs.digests() == referenced_digests(reg)


def test_rm_keeps_blobs_used_by_another_tag(home, tmp_path):
    reg = Registry()
    reg.import_dir(fake_checkpoint(tmp_path / "a", 0), "m:v1")
    reg.tag("m:v1", "m:v2")
    reg.import_dir(fake_checkpoint(tmp_path / "b", 1), "other")
    reg.remove("m:v1")
    reg.verify("m:v2")  # every blob still there and intact
    reg.remove("m:v2")
    assert reg.blobs.digests() == referenced_digests(reg)  # m's weights gone, the shared files kept
    reg.verify("other")


def test_reimport_replaces_the_tag_and_releases_old_blobs(home, tmp_path):
    reg = Registry()
    reg.import_dir(fake_checkpoint(tmp_path / "a", 0), "m")
    old_weights = {f.digest for f in reg.show("m").files if f.path == "model.safetensors"}
    reg.import_dir(fake_checkpoint(tmp_path / "b", 1), "m")
    assert [m.ref for m in reg.list()] == ["m:latest"]
    assert not old_weights & reg.blobs.digests()
    assert reg.blobs.digests() == referenced_digests(reg)


def test_gc_spares_pending_imports_and_drops_dead_ones(home, tmp_path):
    reg = Registry()
    reg.import_dir(fake_checkpoint(tmp_path / "a", 0), "m")
    digests = referenced_digests(reg)
    with registry_index.opened(reg.db_path) as conn:
        registry_index.add_pending(conn, "live-import", sorted(digests))
    reg.remove("m")
    assert reg.blobs.digests() == digests  # an import in progress (this live pid) still needs them
    with registry_index.opened(reg.db_path) as conn, registry_index.transaction(conn):
        conn.execute("UPDATE pending SET pid = ?", (2**22 + 12345,))  # a pid that is not running
    assert reg.gc() == len(digests) and reg.blobs.digests() == set()


# ---------------------------------------------------------------------- materialize and verify
def test_materialized_checkpoint_loads_identical_weights(home, tiny_checkpoint):
    import torch

    from qiusuo.model import load_model

    reg = Registry()
    reg.import_dir(tiny_checkpoint, "tiny:v1")
    path = resolve_model("tiny:v1")
    assert path == reg.materialize("tiny:v1") and path.is_dir()
    original, _ = load_model(tiny_checkpoint)
    served, tok = load_model(path)
    assert tok is not None
    a, b = original.state_dict(), served.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    import shutil

    shutil.rmtree(path)  # re-created when missing
    assert resolve_model("tiny:v1") == path and (path / "config.json").is_file()
    (path / "model.safetensors").unlink()  # and when incomplete
    assert reg.materialize("tiny:v1") == path and (path / "model.safetensors").is_file()


def test_resolve_model_paths_and_errors(home, tmp_path, tiny_checkpoint):
    assert resolve_model(tiny_checkpoint) == tiny_checkpoint
    assert resolve_model(str(tiny_checkpoint)) == tiny_checkpoint
    with pytest.raises(ValueError, match="registry .* is empty; add a checkpoint with `qiusuo models import"):
        resolve_model("nothing-here")
    Registry().import_dir(tiny_checkpoint, "alpha")
    Registry().import_dir(tiny_checkpoint, "beta:v2")
    with pytest.raises(UnknownModelError, match=r"no model 'gamma:latest'.*known: alpha:latest, beta:v2"):
        resolve_model("gamma")
    with pytest.raises(ValueError, match=r"neither a checkpoint directory .* known: alpha:latest, beta:v2"):
        resolve_model(str(tmp_path / "no such dir"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        resolve_model(tmp_path / "empty")


def test_corrupt_blob_is_reported_by_verify_and_not_served(home, tmp_path):
    reg = Registry()
    info = reg.import_dir(fake_checkpoint(tmp_path / "a", 0), "m:v1")
    reg.materialize("m:v1")
    weights = next(f for f in info.files if f.path == "model.safetensors")
    corrupt(reg, weights.digest)
    for call in (lambda: reg.verify("m:v1"), lambda: reg.materialize("m:v1"), lambda: resolve_model("m:v1")):
        with pytest.raises(CorruptBlobError, match=r"model m:v1 .*model\.safetensors: blob sha256-\w+ is corrupt"):
            call()
    reg.blobs.path(weights.digest).unlink()
    with pytest.raises(CorruptBlobError, match="model.safetensors: blob .* is missing"):
        reg.verify("m:v1")
    reg.import_dir(tmp_path / "a", "m:v1")  # re-importing heals the store
    reg.verify("m:v1")
    assert (reg.materialize("m:v1") / "model.safetensors").read_bytes() == (tmp_path / "a/model.safetensors").read_bytes()


def test_import_errors(home, tmp_path):
    reg = Registry()
    with pytest.raises(FileNotFoundError):
        reg.import_dir(tmp_path / "missing", "m")
    (tmp_path / "noconfig").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        reg.import_dir(tmp_path / "noconfig", "m")
    bad = fake_checkpoint(tmp_path / "bad", 0)
    (bad / "model.safetensors").write_bytes(b"\xff" * 20)
    with pytest.raises(ValueError, match="not a safetensors file or is truncated"):
        reg.import_dir(bad, "m")
    assert reg.list() == []


# ---------------------------------------------------------------------- concurrency
def _import_worker(home: str, sources: list[str], worker: int, barrier) -> None:
    os.environ["QIUSUO_HOME"] = home
    reg = Registry()
    barrier.wait()
    for j, src in enumerate(sources):
        reg.import_dir(src, f"w{worker}-m{j}")
        reg.import_dir(src, "contended")  # every worker replaces the same name:tag
    reg.remove(f"w{worker}-m0")


def test_concurrent_imports_keep_the_index_consistent(home, tmp_path):
    sources = [str(fake_checkpoint(tmp_path / f"src{j}", seed=j)) for j in range(3)]
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=_import_worker, args=(str(home), sources, w, barrier)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]

    reg = Registry()
    expected = sorted(["contended:latest"] + [f"w{w}-m{j}:latest" for w in range(4) for j in (1, 2)])
    assert [m.ref for m in reg.list()] == expected
    for m in reg.list():
        reg.verify(m.ref)
    assert reg.blobs.digests() == referenced_digests(reg)  # nothing missing, nothing orphaned
    assert not list(reg.blobs.root.glob(".tmp-*"))
    with sqlite3.connect(reg.db_path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("SELECT COUNT(*) FROM pending").fetchone()[0] == 0
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


# ---------------------------------------------------------------------- CLI
@pytest.fixture
def qiusuo(monkeypatch):
    if "models" not in cli.COMMAND_MODULES:
        monkeypatch.setattr(cli, "COMMAND_MODULES", [*cli.COMMAND_MODULES, "models"])
    return cli.main


def test_cli_verbs(home, tmp_path, qiusuo, capsys):
    ckpt = fake_checkpoint(tmp_path / "c", 0, meta={"run_dir": "runs/sft-2"})
    assert qiusuo(["models", "list"]) == 0
    assert "no models" in capsys.readouterr().out
    assert qiusuo(["models", "import", str(ckpt), "--name", "tiny:sft", "--eval-score", "0.75"]) == 0
    assert "imported" in capsys.readouterr().out
    assert qiusuo(["models", "tag", "tiny:sft", "tiny"]) == 0
    assert qiusuo(["models", "list"]) == 0
    out = capsys.readouterr().out
    for text in ("NAME", "tiny", "sft", "latest", "Qwen2ForCausalLM", "runs/sft-2", "0.75"):
        assert text in out
    assert qiusuo(["models", "show", "tiny:sft"]) == 0
    out = capsys.readouterr().out
    assert "model.safetensors" in out and "tokenizer.json" in out and "parameters: 136" in out
    assert qiusuo(["models", "verify", "tiny"]) == 0
    assert "intact" in capsys.readouterr().out
    assert qiusuo(["models", "rm", "tiny"]) == 0
    assert [m.ref for m in Registry().list()] == ["tiny:sft"]


def test_cli_errors_are_one_line_and_exit_2(home, tmp_path, qiusuo, capsys):
    ckpt = fake_checkpoint(tmp_path / "c", 0)
    assert qiusuo(["models", "import", str(ckpt), "--name", "bad name"]) == 2
    assert qiusuo(["models", "show", "ghost"]) == 2
    assert qiusuo(["models", "rm", "ghost"]) == 2
    assert qiusuo(["models", "import", str(tmp_path / "nope"), "--name", "x"]) == 2
    qiusuo(["models", "import", str(ckpt), "--name", "m"])
    corrupt(Registry(), Registry().show("m").files[0].digest)
    assert qiusuo(["models", "verify", "m"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 5 and all(line.startswith("qiusuo models: error: ") for line in err)
    assert "invalid model name" in err[0] and "ghost" in err[1] and "corrupt" in err[4]


# ---------------------------------------------------------------------- hardening (issue 16)
def test_home_is_created_private(home, tmp_path):
    Registry().import_dir(fake_checkpoint(tmp_path / "c", 0), "m")
    assert (home.stat().st_mode & 0o777) == 0o700


def test_import_refuses_symlinks_leading_out_of_the_checkpoint(home, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("api-key-123")
    secret.chmod(0o600)
    ckpt = fake_checkpoint(tmp_path / "c", 0)
    (ckpt / "notes.txt").symlink_to(secret)
    reg = Registry()
    with pytest.raises(RegistryError, match=r"notes\.txt is a symlink to .*secret\.txt, outside the checkpoint"):
        reg.import_dir(ckpt, "m")
    assert reg.list() == []
    assert not any(b.read_bytes() == b"api-key-123" for b in reg.blobs.root.glob("sha256-*")) \
        if reg.blobs.root.is_dir() else True
    (ckpt / "notes.txt").unlink()
    (ckpt / "sub").mkdir()
    (ckpt / "sub" / "up").symlink_to(tmp_path)  # a directory link out
    with pytest.raises(RegistryError, match="symlinked directory"):
        reg.import_dir(ckpt, "m")
    (ckpt / "sub" / "up").unlink()
    (ckpt / "alias.json").symlink_to(ckpt / "config.json")  # a link inside is fine
    assert "alias.json" in [f.path for f in reg.import_dir(ckpt, "m").files]


def test_import_of_a_hugging_face_cache_snapshot_follows_its_blob_links(home, tmp_path):
    repo = tmp_path / "hub" / "models--org--tiny"
    src = fake_checkpoint(tmp_path / "src", 0)
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for f in src.iterdir():
        blob = repo / "blobs" / f"hash-{f.name}"
        blob.write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(Path("../../blobs") / blob.name)
    info = Registry().import_dir(snap, "hf")
    assert sorted(f.path for f in info.files) == sorted(f.name for f in src.iterdir())


SERVER = """
import sys, time
from qiusuo.registry import resolve_model
resolve_model(sys.argv[1])
print("ready", flush=True)
time.sleep(120)
"""


def test_rm_tag_and_reimport_refuse_a_model_a_running_server_uses(home, tmp_path, qiusuo, capsys):
    import subprocess
    import sys

    ckpt = fake_checkpoint(tmp_path / "c", 0)
    reg = Registry()
    reg.import_dir(ckpt, "m:v1")
    reg.import_dir(ckpt, "other")
    script = tmp_path / "fake_server.py"
    script.write_text(SERVER)
    env = {**os.environ, "QIUSUO_HOME": str(home), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    server = subprocess.Popen([sys.executable, str(script), "m:v1"], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert server.stdout.readline().strip() == "ready"
        directory = reg.materialized_path("m:v1")
        for attempt in (lambda: reg.remove("m:v1"), lambda: reg.tag("other", "m:v1"),
                        lambda: reg.import_dir(ckpt, "m:v1")):
            with pytest.raises(RegistryError, match=rf"in use by pid {server.pid}: .*fake_server\.py m:v1"):
                attempt()
            assert (directory / "config.json").is_file()  # still there for the server
        assert qiusuo(["models", "rm", "m:v1"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "in use by" in err[0]
    finally:
        server.kill()
        server.wait()
    reg.remove("m:v1")  # the holder is gone (its flock went with it): allowed
    assert not reg.materialized_path("m:v1").exists()


def test_lease_in_process_and_release(home, tmp_path):
    reg = Registry()
    reg.import_dir(fake_checkpoint(tmp_path / "c", 0), "m")
    lease = reg.lease("m", holder="deployment adder (replica 1)")
    with pytest.raises(RegistryError, match=r"deployment adder \(replica 1\)"):
        reg.remove("m")
    lease.release()
    reg.remove("m")


def test_models_list_escapes_markup_and_control_characters(home, tmp_path, qiusuo, capsys):
    ckpt = fake_checkpoint(tmp_path / "c", 0, meta={"run_dir": "[link=http://evil.example]runs/x[/link]\x1b[2J"})
    (ckpt / "config.json").write_text(json.dumps({"architectures": ["[bold red]Evil[/bold red]"],
                                                  "model_type": "qwen2"}))
    qiusuo(["models", "import", str(ckpt), "--name", "m"])
    capsys.readouterr()
    assert qiusuo(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "[bold red]Evil[/bold red]" in out and "[link=http://evil.example]runs/x[/link]" in out
    assert "\x1b" not in out and "\\x1b[2J" in out
    assert qiusuo(["models", "show", "m"]) == 0
    assert "\x1b" not in capsys.readouterr().out


def test_a_deployment_replica_leases_the_materialized_directory_it_was_given(home, tmp_path):
    """Replicas get a path, not a name (the deploying CLI exits): they lease by path, for the model
    and for each adapter (--lora-modules), nested names included."""
    from qiusuo.registry import lease_materialized

    reg = Registry()
    reg.import_dir(fake_checkpoint(tmp_path / "c", 0), "m:v1")
    reg.import_dir(fake_checkpoint(tmp_path / "d", 1), "team/sql:v2")
    path, nested = reg.materialize("m:v1"), reg.materialize("team/sql:v2")
    assert lease_materialized(tmp_path / "c", "x") is None  # a plain directory: nothing to lease
    fake = tmp_path / "models" / "m@v1"
    fake.mkdir(parents=True)
    assert lease_materialized(fake, "x") is None  # named like one, but no registry's
    leases = [lease_materialized(p, "deployment m-v1 (Ray Serve replica)") for p in (path, nested)]
    for ref in ("m:v1", "team/sql:v2"):
        with pytest.raises(RegistryError, match=r"in use by pid \d+: deployment m-v1 \(Ray Serve replica\)"):
            reg.remove(ref)
    for lease in leases:
        lease.release()
    reg.remove("m:v1")
    reg.remove("team/sql:v2")
