"""Memory-lean training: log-probs through the output head in chunks of positions (values and gradients
equal the unchunked computation's, and no logits tensor holds more than a chunk), and per-layer gradient
checkpointing (gradients equal with it on and off)."""

from __future__ import annotations

import pytest
import torch
from helpers import randomize_

from qiusuo.model import Transformer, lora, preset
from qiusuo.train.objectives import completion_token_logprobs, policy_loss

torch.set_num_threads(1)
VOCAB = 50


def model_and_batch(name, seed=1):
    model = Transformer(preset(name, vocab_size=VOCAB, num_hidden_layers=2)).train()
    randomize_(model, seed=seed)
    g = torch.Generator().manual_seed(seed)
    p1, p2 = [1, 5, 6, 7], [1, 9]
    rows = [(p1, torch.randint(3, VOCAB, (n,), generator=g).tolist()) for n in (6, 3, 9)] + \
           [(p2, torch.randint(3, VOCAB, (n,), generator=g).tolist()) for n in (4, 7, 1)]
    S = max(len(p) + len(c) for p, c in rows)
    ids = torch.zeros(len(rows), S, dtype=torch.long)
    mask = torch.zeros(len(rows), S, dtype=torch.bool)
    for i, (p, c) in enumerate(rows):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        mask[i, len(p): len(p) + len(c)] = True
    return model, ids, mask


def grpo_grads(model, ids, mask, **kw):
    """Values, entropy and parameter gradients of the GRPO loss on a batch (one group of 3, one of 3)."""
    model.zero_grad()
    logp, ent = completion_token_logprobs(model, ids, mask, with_entropy=True, **kw)
    adv = torch.tensor([1.0, -0.5, -0.5, 0.7, -1.2, 0.5])
    old = logp.detach() + 0.05 * torch.arange(logp.numel()).view_as(logp).sin()  # ratios != 1: clipping active
    loss = policy_loss(logp, old, adv, mask, beta=0.04, ref_logp=old - 0.1).loss
    loss.backward()
    return logp.detach(), ent, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["tiny-dense", "tiny-moe"])
def test_chunked_logprobs_and_loss_gradients_equal_the_unchunked(name):
    model, ids, mask = model_and_batch(name)
    logp, ent, grads = grpo_grads(model, ids, mask, chunk_tokens=10_000)  # one chunk: the plain computation
    for chunk in (1, 4, 7):
        logp_c, ent_c, grads_c = grpo_grads(model, ids, mask, chunk_tokens=chunk)
        torch.testing.assert_close(logp_c, logp, atol=1e-6, rtol=0)
        torch.testing.assert_close(ent_c, ent, atol=1e-6, rtol=0)
        assert grads_c.keys() == grads.keys() and len(grads) > 10
        for k in grads:
            torch.testing.assert_close(grads_c[k], grads[k], atol=1e-6, rtol=0, msg=k)


def test_no_logits_tensor_holds_more_than_a_chunk_forward_or_backward():
    model, ids, mask = model_and_batch("tiny-dense")
    rows = []
    inner = model.logits

    def spy(h):
        rows.append(h.reshape(-1, h.shape[-1]).shape[0])
        return inner(h)

    model.logits = spy
    logp, _ = completion_token_logprobs(model, ids, mask, chunk_tokens=4)
    forward_calls = len(rows)
    logp.sum().backward()
    assert max(rows) <= 4 and forward_calls > 5
    assert len(rows) == 2 * forward_calls  # every chunk recomputed once in the backward, none kept
    rows.clear()
    completion_token_logprobs(model, ids, mask)  # default: the tiny vocabulary's whole batch fits one chunk
    assert max(rows) > 20 and len(rows) <= 2  # whole length groups (one or two here), not chunks


@pytest.mark.parametrize("name", ["tiny-dense", "tiny-moe"])
def test_gradient_checkpointing_gives_equal_gradients(name):
    model, ids, mask = model_and_batch(name)
    lora.apply_lora(model, r=4, alpha=8)  # adapters upstream of checkpointed layers get their gradients too
    with torch.no_grad():
        for m in lora.lora_layers(model):
            m.lora_B.weight.normal_(0, 0.05)
    calls = []
    # the layer's first module (the recompute stops early, once the last saved activation is rebuilt)
    model.model.layers[0].input_layernorm.register_forward_hook(lambda *a: calls.append(1))
    _, _, plain = grpo_grads(model, ids, mask)
    n_plain = len(calls)
    model.gradient_checkpointing = True
    _, _, ckpt = grpo_grads(model, ids, mask)
    assert len(calls) - n_plain == 2 * n_plain  # each forward of the layer re-run in the backward
    assert ckpt.keys() == plain.keys() and all(".lora_" in k for k in plain)
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], atol=1e-6, rtol=0, msg=k)
    model.zero_grad()
    out = model.compute_loss(ids, mask)  # pretraining / SFT's loss through the same hook
    out.loss.backward()
    g1 = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.gradient_checkpointing = False
    model.zero_grad()
    model.compute_loss(ids, mask).loss.backward()
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(g1[n], p.grad, atol=1e-6, rtol=0, msg=n)


def test_trainer_sets_gradient_checkpointing_from_the_config(tmp_path, make_checkpoint):
    from qiusuo.train.config import GRPOConfig
    from qiusuo.train.grpo import GRPO
    from helpers import DigitsTask

    cfg = GRPOConfig(model=str(make_checkpoint(num_hidden_layers=2)), out=str(tmp_path / "r"), prompts_per_step=2,
                     group_size=4, max_tokens=6, steps=1, threads=1, progress=False, gradient_checkpointing=True)
    run = GRPO(cfg, task=DigitsTask())
    assert run.model.gradient_checkpointing
    assert run.run().step == 1


@pytest.mark.parametrize("name", ["tiny-dense", "tiny-moe"])
def test_pretraining_and_sft_loss_chunked_equals_unchunked(name, monkeypatch):
    """compute_loss (pretraining, SFT, MTP's depths too) runs through the same chunked log-probs: the
    value equals F.cross_entropy on the full logits, and gradients equal, with 3 positions per chunk."""
    import torch.nn.functional as F

    from qiusuo.model import logprobs

    model, ids, mask = model_and_batch(name)
    model.zero_grad()
    out = model.compute_loss(ids, mask)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    with torch.no_grad():
        full = F.cross_entropy(model(ids)[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1), reduction="none")
        m = mask[:, 1:].reshape(-1).float()
        assert out.lm_loss.item() == pytest.approx(float((full * m).sum() / m.sum()), abs=1e-6)
    calls = []
    inner = model.logits
    model.logits = lambda h: calls.append(h.reshape(-1, h.shape[-1]).shape[0]) or inner(h)
    monkeypatch.setattr(logprobs, "LOGIT_CHUNK_ELEMENTS", 3 * VOCAB)
    model.zero_grad()
    chunked = model.compute_loss(ids, mask)
    chunked.loss.backward()
    assert max(calls) == 3
    torch.testing.assert_close(chunked.loss, out.loss, atol=1e-6, rtol=0)
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, grads[n], atol=1e-6, rtol=0, msg=n)


_MMAP_CHILD = """
import ctypes, json, sys, torch
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]
mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = MallInfo2
if sys.argv[1] == "trainer":
    from types import SimpleNamespace
    from qiusuo.train.loop import setup_torch
    setup_torch(SimpleNamespace(threads=1, seed=0))  # what every trainer runs first
mapped = []  # whether each large tensor got a mapping of its own (glibc's mmapped bytes grew by its size)
for size in (4 << 20, 4 << 20, 2 << 20):
    before = mallinfo2().hblkhd
    t = torch.empty(size, dtype=torch.uint8)
    mapped.append(mallinfo2().hblkhd - before >= size)
    del t
print(json.dumps(mapped))
"""


def test_trainers_pin_the_mmap_threshold_so_large_transients_are_always_mapped():
    """glibc raises its mmap threshold when a large mapped block is freed, so a training step's next large
    transients came from the heap and fragmented it (GRPO LoRA at the Qwen2.5-0.5B shape peaked at
    8.5 GiB, 4.2 GiB with the threshold pinned; bench/grpo_real.py). Every trainer pins it (setup_torch).
    The mechanism, read from glibc's own counters (mallinfo2) in a fresh process: by default a second
    4 MiB tensor, after the first is freed, comes from the heap; after a trainer's setup_torch, every one
    gets its own mapping."""
    import json
    import os
    import subprocess
    import sys

    import ctypes

    if not hasattr(ctypes.CDLL(None), "mallinfo2"):  # (not pinned here: this process is the test runner)
        pytest.skip("not glibc 2.33+ (no mallinfo2): nothing to read")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    mapped = {}
    for how in ("default", "trainer"):
        proc = subprocess.run([sys.executable, "-c", _MMAP_CHILD, how], capture_output=True, text=True,
                              timeout=120, env={**env, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-2000:]
        mapped[how] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert mapped == {"default": [True, False, False], "trainer": [True, True, True]}, mapped
