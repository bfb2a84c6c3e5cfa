"""Helpers shared by test modules (imported as `helpers`: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import torch

from qiusuo.model import Transformer, preset


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.08) -> None:
    """Random weights everywhere (incl. norms, biases, the router bias) so parity tests see every
    term; std 0.08 makes logits peaked, so greedy ties are not a coin flip."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if "inv_freq" in name or "expert_load" in name or not t.is_floating_point():
                continue
            if name.endswith("norm.weight"):
                t.copy_(1 + 0.1 * torch.randn(t.shape, generator=g))
            elif "e_score_correction_bias" in name:
                t.copy_(0.05 * torch.randn(t.shape, generator=g))
            else:
                t.copy_(std * torch.randn(t.shape, generator=g))


class ScriptedModel(Transformer):
    """A tiny transformer whose next token is `table[previous token]`, whatever its weights say.

    The real forward still runs (the engine's paged cache is written as usual); only the logits are
    replaced, so greedy and seeded sampling both follow the script.
    """

    def __init__(self, table: dict[int, int], tok):
        super().__init__(preset("tiny-dense", vocab_size=tok.vocab_size, bos_token_id=tok.bos_token_id,
                                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, num_hidden_layers=1))
        self.table, self.eos = table, tok.eos_token_id

    def hidden_states(self, input_ids, positions=None, cache=None):
        h = super().hidden_states(input_ids, positions, cache=cache)
        last = positions.argmax(dim=1)  # (B,) the last real position of each (right-padded) row
        self._prev = input_ids[torch.arange(input_ids.shape[0]), last].tolist()
        return h

    def logits(self, h):
        out = torch.full((h.shape[0], self.config.vocab_size), -20.0)  # (B, V)
        for row, prev in enumerate(self._prev):
            out[row, self.table.get(prev, self.eos)] = 20.0
        return out


# The chat the API-translation tests serve (test_serve_ollama.py, test_serve_anthropic.py): after the
# assistant marker `<think>`, then "r" until the think block is closed for it, then THINK_SCRIPT_ANSWER
# spelled in bytes (plain text, not the think tag), then eos.
THINK_SCRIPT_ANSWER = "Ab<think>"


def think_script(tok) -> dict[int, int]:
    """The ScriptedModel table of that chat for tokenizer `tok` (the built-in byte tokenizer)."""
    def b(ch: str) -> int:
        (tid,) = tok.encode(ch)
        return tid

    table = {tok.token_to_id("<|assistant|>"): tok.think_start_id, tok.think_start_id: b("r"), b("r"): b("r"),
             tok.think_end_id: b(THINK_SCRIPT_ANSWER[0])}
    for a, c in zip(THINK_SCRIPT_ANSWER, THINK_SCRIPT_ANSWER[1:]):
        table[b(a)] = b(c)
    table[b(THINK_SCRIPT_ANSWER[-1])] = tok.eos_token_id
    return table



# A chat template with a tool format: Qwen2.5's shape (tools in the system turn, `<tool_call>` JSON
# calls, `<tool_response>` results) on the built-in tokenizer's role markers, so the server picks the
# hermes parser from it (test_serve_guided.py, test_serve_anthropic_tools.py).
HERMES_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}<|system|># Tools\n<tools>\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}</tools>\n"
    "For each call return <tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>"
    "{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'system' %}<|system|>{{ m.content }}"
    "{% elif m.role == 'user' %}<|user|>{{ m.content }}"
    "{% elif m.role == 'assistant' %}<|assistant|>{{ m.content or '' }}"
    "{% for tc in m.tool_calls or [] %}<tool_call>\n{\"name\": \"{{ tc.function.name }}\", \"arguments\": "
    "{{ tc.function.arguments | tojson }}}\n</tool_call>{% endfor %}{{ eos_token }}"
    "{% elif m.role == 'tool' %}<|user|><tool_response>\n{{ m.content }}\n</tool_response>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


class DigitsTask:
    """Toy task: reward = share of the completion's characters that are digits (optimum: all digits)."""

    name = "toy-digits"

    def generate(self, n, seed, split="train"):
        from qiusuo.tasks.base import Problem

        return [Problem(prompt=f"{(seed + i) % 10}=", question="q", answer="0") for i in range(n)]

    def score_many(self, problems, texts):
        from qiusuo.tasks.base import Score

        out = []
        for t in texts:
            r = sum(c.isdigit() for c in t) / len(t) if t else 0.0
            out.append(Score(reward=r, format=float(bool(t)), accuracy=float(r == 1.0), parsed_answer=None))
        return out


def assert_greedy_equal_up_to_ties(got: list[list[int]], reference, tol: float = 0.01) -> None:
    """Greedy token ids `got` equal the reference outputs' ids, except that a sequence may leave them at a
    near-tie of the reference: where it first differs, its token must be one of the reference's top
    logprobs there, within `tol` nats of the reference's chosen token (two kernels that round differently
    break a tie differently; after that the continuations are of different prefixes, so are not compared).
    `reference`: RequestOutputs generated with `SamplingParams(temperature=0, logprobs=k)`, k >= 2."""
    for i, (ids, out) in enumerate(zip(got, reference, strict=True)):
        comp = out.outputs[0]
        want = list(comp.token_ids)
        j = next((j for j, (a, b) in enumerate(zip(ids, want)) if a != b), None)
        if j is None:
            assert len(ids) == len(want), (i, ids, want)
            continue
        top = {t: lp.logprob for t, lp in comp.logprobs[j].items()}
        assert ids[j] in top, f"sequence {i} token {j}: {ids[j]} is not among the reference's top {sorted(top)}"
        gap = top[want[j]] - top[ids[j]]
        assert gap <= tol, f"sequence {i} token {j}: {ids[j]} is {gap:.4f} nats below the reference's {want[j]}"


def wait_healthy(proc, url: str, timeout: float = 120.0) -> None:
    """Wait for a `qiusuo serve` subprocess at `url` to answer /health with 200; fail with its output if it
    exits first, or when `timeout` seconds pass."""
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "the server did not become healthy"
        try:
            if httpx.get(url + "/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)


def llama_cpp_model(path, **kwargs):
    """llama_cpp.Llama(path, **kwargs) without llama.cpp's extra buffer types (its weight repacking; the
    tools' `--no-repack`): on a CPU with AMX, repacking into its AMX buffer aborted the process, on a
    tiny-moe f16 GGUF in its graph scheduler (`GGML_ASSERT(*cur_backend_id != -1)`, ggml-backend.cpp,
    llama-cpp-python 0.3.36) and on q8_0/q4_0 in `ggml_backend_amx_mul_mat` (ggml-org/llama.cpp#20824).
    Llama's constructor takes no such option, so its default model params are patched while it loads."""
    import pytest

    llama_cpp = pytest.importorskip("llama_cpp")
    default = llama_cpp.llama_cpp.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    llama_cpp.llama_cpp.llama_model_default_params = params  # what Llama.__init__ reads
    try:
        return llama_cpp.Llama(str(path), **kwargs)
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = default
