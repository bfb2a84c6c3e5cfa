"""The training loop: config validation, schedule, exact resume, NaN stop, Ctrl-C, SFT and distill."""

from __future__ import annotations

import json

import pytest
import torch

from qiusuo.model import build_model
from qiusuo.train.config import DistillConfig, GRPOConfig, PretrainConfig, SFTConfig, TrainConfig
from qiusuo.train.loop import NonFiniteLossError, lr_at
from qiusuo.train.pretrain import Pretrain
from qiusuo.train.sft import SFT

torch.set_num_threads(1)
FAST = dict(threads=1, progress=False)


def tiny_pretrain(tmp_path, name="run", **kw) -> PretrainConfig:
    args = dict(out=str(tmp_path / name), steps=4, batch_size=8, warmup_steps=1, preset="tiny-dense", **FAST)
    return PretrainConfig(**{**args, **kw})


@pytest.fixture(scope="module")
def ckpt(make_checkpoint):
    return str(make_checkpoint())


# ------------------------------------------------------------------ config validation
@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=10, grad_accum=3), "not divisible by --grad-accum"),
    (dict(warmup_steps=10, steps=5), "--warmup-steps"),
    (dict(lr=0.0), "--lr must be positive"),
    (dict(schedule="linear"), "'cosine', 'constant'"),  # the allowed values, named
    (dict(dtype="fp8"), "--dtype"),
    (dict(p_direct=1.5), "--p-direct"),
    (dict(difficulty="2;3"), "comma-separated integers"),
    (dict(blurt_rows=1.0), "--blurt-rows"),
    (dict(blurt_rows=0.3, p_direct=0.0), "--blurt-rows"),
])
def test_pretrain_config_errors_name_the_fix(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_pretrain(tmp_path, **kwargs)


def test_pretrain_difficulty_mixes_lengths_in_the_corpus(tmp_path):
    """--difficulty 1,2 draws 1- and 2-digit problems (a mix of lengths); a level the task lacks
    fails before the first step."""
    from qiusuo.train.pretrain import Pretrain

    pre = Pretrain(tiny_pretrain(tmp_path, difficulty="1,2", batch_size=64))
    digits = {len(str(p.metadata["a"])) for p, _ in pre.task.corpus(64, seed=3, mix=pre.mix, difficulty=pre.levels)}
    assert digits == {1, 2}, digits
    rows = pre.batch_rows(0)
    assert max(len(r) for r, _ in rows) < 40  # no 3-digit scratchpad (42 tokens) in the step
    with pytest.raises(ValueError, match="difficulty"):
        Pretrain(tiny_pretrain(tmp_path, "bad", difficulty="1,99"))


def test_grpo_config_errors(tmp_path, ckpt):
    with pytest.raises(ValueError, match="no config.json"):
        GRPOConfig(model=str(tmp_path / "missing"), **FAST)
    with pytest.raises(ValueError, match="at least 2 samples"):
        GRPOConfig(model=ckpt, group_size=1, **FAST)
    with pytest.raises(ValueError, match="not divisible by --minibatches"):
        GRPOConfig(model=ckpt, prompts_per_step=6, minibatches=4, **FAST)
    with pytest.raises(ValueError, match="temperature > 0"):
        GRPOConfig(model=ckpt, temperature=0.0, **FAST)
    with pytest.raises(ValueError, match="use --minibatches"):
        GRPOConfig(model=ckpt, grad_accum=2, **FAST)
    with pytest.raises(ValueError, match="--loss-agg"):
        GRPOConfig(model=ckpt, loss_agg="mean", **FAST)
    with pytest.raises(ValueError, match="--data"):
        SFTConfig(model=ckpt, data=str(tmp_path / "none.jsonl"), **FAST)
    with pytest.raises(ValueError, match="--keep-per-prompt"):
        DistillConfig(teacher=ckpt, student=ckpt, samples_per_prompt=2, keep_per_prompt=3, **FAST)


def test_unknown_task_is_rejected_before_the_first_step(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'nope'.*arithmetic"):
        Pretrain(tiny_pretrain(tmp_path, task="nope"))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_threads_default_follows_the_load():
    cfg = TrainConfig(progress=False)
    assert cfg.threads in (1, 2)


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(steps=11, lr=1.0, warmup_steps=2, min_lr_ratio=0.1, threads=1)
    assert lr_at(cfg, 0) == pytest.approx(0.5) and lr_at(cfg, 1) == pytest.approx(1.0)
    assert lr_at(cfg, 2) == pytest.approx(1.0) and lr_at(cfg, 10) == pytest.approx(0.1)
    assert lr_at(cfg, 6) == pytest.approx(0.55)  # half way down the cosine
    const = TrainConfig(steps=11, lr=1.0, schedule="constant", threads=1)
    assert {lr_at(const, s) for s in range(11)} == {1.0}


# ------------------------------------------------------------------ run directory and resume
def test_pretrain_writes_a_run_directory(tmp_path):
    result = Pretrain(tiny_pretrain(tmp_path)).run()
    run = tmp_path / "run"
    assert result.status == "completed" and result.step == 4
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert {"loss", "lr", "tokens", "tokens_per_s", "time", "grad_norm"} <= set(rows[0])
    assert json.loads((run / "config.json").read_text())["config"]["batch_size"] == 8
    meta = json.loads((run / "final" / "qiusuo.json").read_text())
    assert meta["stage"] == "pretrain" and meta["recipe"]["steps"] == 4 and "loss" in meta["metrics"]
    with pytest.raises(ValueError, match="--resume"):  # never clobber a finished run silently
        Pretrain(tiny_pretrain(tmp_path)).run()


def test_register_imports_the_final_model(tmp_path, monkeypatch):
    from qiusuo.registry import Registry

    monkeypatch.setenv("QIUSUO_HOME", str(tmp_path / "home"))
    with pytest.raises(ValueError, match="name"):  # a bad name fails before any step
        tiny_pretrain(tmp_path, "bad", register="no spaces allowed")
    Pretrain(tiny_pretrain(tmp_path, register="tiny-base:v1")).run()
    info = Registry().show("tiny-base:v1")
    assert info.source_run == str(tmp_path / "run")
    assert info.architecture == "Qwen2ForCausalLM"


def _interrupt_after(stage, n_steps: int):
    """Ask the trainer to stop (what the Ctrl-C handler does) once n_steps are done."""
    inner = stage.train_step

    def step_fn(step):
        out = inner(step)
        if step + 1 == n_steps:
            stage.trainer._stop_requested = True
        return out

    stage.train_step = step_fn


def _state(stage):
    params = {k: v.clone() for k, v in stage.model.state_dict().items()}
    opt = stage.trainer.optimizer.state_dict()["state"]
    return params, {k: {n: t.clone() for n, t in s.items()} for k, s in opt.items()}


@pytest.mark.parametrize("preset", ["tiny-dense", "tiny-moe"])
def test_resume_equals_an_uninterrupted_run(tmp_path, preset):
    straight = Pretrain(tiny_pretrain(tmp_path, "straight", preset=preset))
    straight.run()

    first = Pretrain(tiny_pretrain(tmp_path, "split", preset=preset))
    _interrupt_after(first, 2)
    result = first.run()
    assert result.status == "interrupted" and result.step == 2
    torch.manual_seed(12345)  # disturb the global RNG: resume must restore it
    second = Pretrain(tiny_pretrain(tmp_path, "split", preset=preset, resume=True))
    assert second.run().step == 4

    (p1, o1), (p2, o2) = _state(straight), _state(second)
    for k in p1:
        assert torch.equal(p1[k], p2[k]), k
    for k in o1:
        for n in o1[k]:
            assert torch.equal(o1[k][n], o2[k][n]), (k, n)
    losses = lambda name: [json.loads(x)["loss"] for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert losses("straight") == losses("split")


def test_resume_refuses_a_changed_recipe_and_a_missing_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="no checkpoint"):
        Pretrain(tiny_pretrain(tmp_path, resume=True)).run()
    Pretrain(tiny_pretrain(tmp_path, steps=2)).run()
    with pytest.raises(ValueError, match="different lr"):
        Pretrain(tiny_pretrain(tmp_path, steps=4, lr=1e-3, resume=True)).run()
    assert Pretrain(tiny_pretrain(tmp_path, steps=3, resume=True)).run().step == 3  # more steps is fine


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    stage = Pretrain(tiny_pretrain(tmp_path, steps=6, save_every=2))
    real = stage.model.compute_loss

    def poisoned(ids, mask):  # every micro-batch of the 3rd step (a step may run several length groups)
        out = real(ids, mask)
        if stage.trainer._current_step == 2:
            out.loss = out.loss * float("nan")
        return out

    stage.model.compute_loss = poisoned
    with pytest.raises(NonFiniteLossError, match="loss is nan at step 3.*step-000002"):
        stage.run()
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["step-000002"] and not (tmp_path / "run" / "final").exists()


# ------------------------------------------------------------------ SFT and distillation
def test_sft_reads_prompt_completion_and_chat_records(tmp_path, ckpt):
    data = tmp_path / "data.jsonl"
    records = [{"prompt": "12+34=", "completion": "<think></think><answer>46</answer>"},
               {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = SFTConfig(model=ckpt, data=str(data), out=str(tmp_path / "sft"), steps=3, batch_size=2, lr=1e-3, **FAST)
    stage = SFT(cfg)
    _, mask = stage.rows[0]
    assert sum(mask) == len(stage.tokenizer.encode(records[0]["completion"])) + 1  # completion + eos only
    stage.run()
    meta = json.loads((tmp_path / "sft" / "final" / "qiusuo.json").read_text())
    assert meta["stage"] == "sft" and meta["parent"] == ckpt
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        SFT(SFTConfig(model=ckpt, data=str(bad), out=str(tmp_path / "b"), **FAST))


def test_distill_keeps_only_correct_teacher_samples(tmp_path, ckpt):
    from qiusuo.train.distill import rejection_sample
    from qiusuo.engine import LLM
    from qiusuo.train.data import load_task

    task = load_task("arithmetic")
    problems = task.generate(4, seed=0)
    model, tok = build_model("tiny-dense", seed=0)
    records, stats = rejection_sample(LLM(model=model, tokenizer=tok), tok, task, problems, samples=2,
                                      temperature=1.0, max_tokens=8, seed=0, keep=1)
    assert records == [] and stats["teacher_accuracy"] == 0.0  # a random model solves nothing

    class Oracle:  # an engine stand-in that answers right: every record must be kept once
        def generate(self, prompts, params):
            from types import SimpleNamespace as NS

            return [NS(outputs=[NS(text=task.solution(p, None, "direct"))] * params.n) for p in problems]

    records, stats = rejection_sample(Oracle(), tok, task, problems, 3, 1.0, 8, 0, keep=2)
    assert len(records) == 4 and stats["teacher_accuracy"] == 1.0
    assert records[0] == {"prompt": problems[0].prompt, "completion": task.solution(problems[0], None, "direct")}


# ------------------------------------------------------------------ CLI
def _cli(argv):
    import argparse

    from qiusuo.cli import train

    parser = argparse.ArgumentParser(prog="qiusuo")
    train.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_pretrain_then_grpo_then_resume(tmp_path):
    common = ["--threads", "1", "--no-progress", "--seed", "3"]
    assert _cli(["pretrain", "--out", str(tmp_path / "pt"), "--steps", "2", "--batch-size", "4",
                 "--warmup-steps", "1", *common]) == 0
    base = str(tmp_path / "pt" / "final")
    grpo = ["grpo", "--model", base, "--out", str(tmp_path / "rl"), "--prompts-per-step", "2", "--group-size", "2",
            "--max-tokens", "4", "--scale-rewards", "none", "--dynamic-sampling", *common]
    assert _cli([*grpo, "--steps", "1"]) == 0
    assert _cli([*grpo, "--steps", "2", "--resume"]) == 0
    saved = json.loads((tmp_path / "rl" / "config.json").read_text())["config"]
    assert saved["dynamic_sampling"] is True and saved["scale_rewards"] == "none" and saved["seed"] == 3
    assert len((tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()) == 2


def test_ctrl_c_saves_a_checkpoint_and_exits(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    code = ("import argparse, sys; from qiusuo.cli import train; p = argparse.ArgumentParser(); "
            "train.register(p.add_subparsers()); a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))")
    proc = subprocess.Popen([sys.executable, "-c", code, "pretrain", "--out", str(out), "--steps", "100000",
                             "--batch-size", "4", "--threads", "1", "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, output
    steps = len(metrics.read_text().splitlines())
    assert f"saved step {steps}" in output
    assert (out / "checkpoints" / f"step-{steps:06d}" / "trainer_state.json").is_file()


# ------------------------------------------------------------------ checkpoint crash safety (issue 16)
@pytest.fixture
def saver(tmp_path):
    from qiusuo.train import state

    model, tok = build_model("tiny-dense", seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    run = tmp_path / "run"

    def save(step, keep=2):
        return state.save_checkpoint(run, step, model, tok, optimizer, extra={}, keep=keep)

    return run, save


def test_checkpoint_files_and_directories_are_fsynced_before_the_rename(saver, monkeypatch):
    import os

    from qiusuo.train import state

    run, save = saver
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(state.os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(state.os, "replace", lambda a, b: events.append(("replace", str(a), str(b))) or real_replace(a, b))
    final = save(1)
    publish = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(final))
    synced = {e[1] for e in events[:publish] if e[0] == "fsync"}
    tmp = events[publish][1]
    assert {f"{tmp}/{p.name}" for p in final.iterdir()} <= synced  # every file, before the rename
    assert tmp in synced  # and the directory itself
    assert ("fsync", str(final.parent)) in events[publish:]  # the rename itself, after


def test_stale_temporaries_of_killed_saves_are_cleaned_at_start_up(saver):
    import subprocess

    from qiusuo.train.state import list_checkpoints

    run, save = saver
    save(1)
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no longer runs
    stale = run / "checkpoints" / f".step-000002.tmp-{dead.pid}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    assert [p.name for p in list_checkpoints(run)] == ["step-000001"]
    assert not stale.exists()


def test_re_saving_a_step_never_leaves_zero_checkpoints(saver, monkeypatch):
    import os

    from qiusuo.train import state

    run, save = saver
    save(1, keep=1)
    real_replace = os.replace

    def killed_before_publishing(a, b):
        if os.path.basename(b) == "step-000001" and ".tmp-" in str(a):
            raise KeyboardInterrupt  # the process dies between moving the old copy aside and the rename
        real_replace(a, b)

    monkeypatch.setattr(state.os, "replace", killed_before_publishing)
    with pytest.raises(KeyboardInterrupt):
        save(1, keep=1)
    monkeypatch.setattr(state.os, "replace", real_replace)
    # at start-up (the pid of the interrupted save is ours here: not a save in progress) the old copy is back
    found = state.list_checkpoints(run)
    assert [p.name for p in found] == ["step-000001"] and (found[0] / state.STATE_FILE).is_file()
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------ the completion step: length groups, threads
def test_length_micro_batches_cover_every_row_once_and_cut_only_where_padding_pays():
    from qiusuo.train.loop import length_micro_batches

    lengths = [42, 18, 41, 17, 18, 42, 40, 18] * 16  # the demo's mix: blurts and scratchpads
    batches = length_micro_batches(lengths)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert len(batches) >= 2  # blurts are not padded to the scratchpads' length
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert padded < 0.75 * len(lengths) * max(lengths)
    assert all(b == sorted(b) for b in batches)
    assert length_micro_batches([5] * 8) == [list(range(8))]  # equal lengths: one batch
    capped = length_micro_batches([5] * 8, grad_accum=4)  # --grad-accum still bounds a micro-batch
    assert [len(b) for b in capped] == [2, 2, 2, 2]
    assert length_micro_batches([]) == []


def test_the_length_grouped_step_computes_the_one_padded_batch_loss_and_gradients(tmp_path):
    """The same token-weighted mean loss and gradients as one right-padded batch (to fp32 rounding)."""
    from qiusuo.train.data import pad_id, pad_rows

    pre = Pretrain(tiny_pretrain(tmp_path, batch_size=24))
    rows = pre.batch_rows(0)
    assert len({len(r) for r, _ in rows}) > 1
    ids, mask = pad_rows([r for r, _ in rows], [m for _, m in rows], pad_id(pre.tokenizer))
    ref = pre.model.compute_loss(ids, mask)
    ref.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in pre.model.named_parameters()}
    pre.model.zero_grad(set_to_none=True)
    pre.trainer.optimizer_step = lambda: {}  # keep the gradients to compare them
    out = pre.trainer.completion_step(rows, pad_id(pre.tokenizer))
    assert out["loss"] == pytest.approx(float(ref.loss.detach()), rel=1e-5)
    assert out["target_tokens"] == ref.num_tokens and out["padded_tokens"] < ids.numel()
    for n, p in pre.model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-4, atol=1e-6)


def test_blurt_rows_are_importance_weighted_to_keep_the_objectives_mix(tmp_path):
    """--blurt-rows 0.25 draws a quarter of the rows as blurts and weights each of their target tokens by
    (0.6/0.4)/(0.25/0.75) = 4.5, so the weighted share of blurt rows is --p-direct's 0.6; scratchpad
    rows keep weight 1, prompts 0. Without it every weight is 0 or 1 and the rows are the corpus's."""
    cfg = tiny_pretrain(tmp_path, batch_size=400, blurt_rows=0.25)
    assert cfg.blurt_weight() == pytest.approx(4.5)
    pre = Pretrain(cfg)
    rows = pre.batch_rows(0)
    weights = [max(m) for _, m in rows]
    assert set(weights) == {1.0, 4.5}
    for ids, m in rows:  # a blurt row: an empty think block; its weight on every target token
        text = pre.tokenizer.decode([t for t, w in zip(ids, m) if w > 0])
        assert (max(m) == 4.5) == text.startswith("<think></think>"), text
        assert set(m) <= {0, max(m)}
    n_blurt = sum(w == 4.5 for w in weights)
    assert 0.18 < n_blurt / len(rows) < 0.32  # drawn at 25%
    weighted_share = 4.5 * n_blurt / (4.5 * n_blurt + len(rows) - n_blurt)
    assert 0.5 < weighted_share < 0.7  # the objective's 60%
    plain = Pretrain(tiny_pretrain(tmp_path, "plain", batch_size=400))
    assert {max(m) for _, m in plain.batch_rows(0)} == {1}


def test_a_weighted_loss_mask_is_the_weighted_mean_and_a_0_1_float_mask_the_bool_loss():
    """compute_loss with a float mask: the weighted mean of per-token cross-entropies, and num_tokens the
    sum of the weights; 0/1 floats give exactly (bitwise) the bool mask's loss."""
    model, _ = build_model("tiny-dense", seed=0)
    ids = torch.randint(5, 60, (3, 9))
    mask = torch.zeros(3, 9, dtype=torch.bool)
    mask[:, 4:] = True
    ref = model.compute_loss(ids, mask)
    same = model.compute_loss(ids, mask.float())
    assert torch.equal(ref.loss, same.loss) and same.num_tokens == ref.num_tokens == 15
    w = mask.float()
    w[1] *= 3.0
    out = model.compute_loss(ids, w)
    logits = model.logits(model.hidden_states(ids))[:, :-1]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                           reduction="none").reshape(3, 8)
    expected = (ce * w[:, 1:]).sum() / w[:, 1:].sum()
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    assert out.num_tokens == pytest.approx(25.0)


def test_measured_threads_are_logged_per_step_and_summarised(tmp_path, monkeypatch):
    import qiusuo.runtime as runtime

    monkeypatch.setattr(runtime, "_measured", None)
    cfg = tiny_pretrain(tmp_path, steps=6, threads=0)
    assert cfg.auto_threads and cfg.threads >= 1 and "auto_threads" not in cfg.to_dict()
    pre = Pretrain(cfg)
    pre.run()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    tuner = pre.trainer.thread_tuner
    assert tuner is not None and all("threads" in r for r in rows)
    if tuner.candidates == (1, 2):  # 2 cores: steps 2-5 alternate 1 and 2 threads, then one is kept
        assert sorted(r["threads"] for r in rows[1:5]) == [1, 1, 2, 2]
    if len(tuner.candidates) > 1:  # on a 1-core machine there is nothing to measure
        assert tuner.decisions and tuner.summary()["first_measurement"]
        assert rows[-1]["threads"] == tuner.current
    fixed = Pretrain(tiny_pretrain(tmp_path, "fixed", threads=1))
    assert fixed.trainer.thread_tuner is None  # --threads N is kept as given
