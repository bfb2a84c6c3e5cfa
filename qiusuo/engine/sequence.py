"""`Sequence` (one sample being generated) and `SequenceGroup` (a request: one prompt, n samples).

A sequence owns its token ids (prompt + output), its block table, how many of its tokens already
have their KV in the cache, its incremental detokenizer and its stop checks. The scheduler and the
block manager move it between states; `append_token` is the only place tokens are added.
"""

from __future__ import annotations

import enum
from typing import Any

from .outputs import CompletionOutput, Logprob, RequestOutput
from .sampling_params import SamplingParams

_MASK64 = (1 << 64) - 1


def mix_seed(seed: int, index: int) -> int:
    """splitmix64 of (seed, sample index) -> a seed in [0, 2^63) for one sample of a request."""
    z = (seed * 0x9E3779B97F4A7C15 + index + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, seq_id: int, request_id: str, index: int, prompt_token_ids: list[int], params: SamplingParams,
                 seed: int, eos_token_ids: frozenset[int], max_model_len: int, decoder: Any | None):
        self.seq_id = seq_id
        self.request_id = request_id
        self.index = index
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.seed = seed
        self.status = SequenceStatus.WAITING
        # KV bookkeeping (block manager / scheduler)
        self.block_table: list[int] = []
        self.block_cids: list[int] = []  # content ids of the leading full blocks that are hashed
        self.num_computed_tokens = 0  # tokens whose KV is in the cache
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache at the last admission
        self.num_mtp_computed = 0  # MTP speculative decoding: positions whose MTP-layer state is cached
        # stop conditions
        self._stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else eos_token_ids)
        self._max_len = min(max_model_len, self.num_prompt_tokens + (params.max_tokens or max_model_len))
        self._holdback = max((len(s) for s in params.stop_strings), default=1) - 1
        # outputs
        self.decoder = decoder
        self.text = ""
        self.num_emitted_chars = 0
        self.num_emitted_tokens = 0
        self.logprobs: list[dict[int, Logprob]] | None = [] if params.logprobs is not None else None
        self.cumulative_logprob = 0.0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.guided = None  # guided.GuidedState: the sample's grammar, set by the engine
        self.lora_id = 0  # the LoRA adapter its forwards apply (0: the base), set by the engine

    @property
    def stop_token_ids(self) -> frozenset[int]:
        """Tokens that end this sample (eos unless ignore_eos, plus the request's stop_token_ids)."""
        return self._stop_ids

    # ------------------------------------------------------------------ views
    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def num_lookahead_tokens(self, k: int) -> int:
        """Draft tokens worth verifying this step: at most k, and never past max_tokens or the context
        (a step emits up to drafts + 1 tokens; the last token it may emit needs no draft)."""
        return max(0, min(k, self._max_len - self.num_tokens - 1))

    # ------------------------------------------------------------------ generation
    def append_token(self, token_id: int, logprob: float | None = None,
                     top: dict[int, Logprob] | None = None) -> None:
        """Add a sampled token, update the text and decide whether the sequence stops here."""
        self.token_ids.append(token_id)
        if logprob is not None:
            self.cumulative_logprob += logprob
        if self.logprobs is not None:
            self.logprobs.append(top or {})
        if self.guided is not None and self.guided.accept(token_id) and token_id not in self._stop_ids:
            # The grammar is complete and terminated (its stop token was not one of ours: ignore_eos),
            # or it rejected the token (never, with its mask applied): the sample ends here, the
            # token's text left out like a stop token's.
            self.finish("abort" if self.guided.rejected else "stop", "grammar" if self.guided.rejected else token_id)
            return
        if token_id in self._stop_ids:
            self.finish("stop", None if token_id not in self.params.stop_token_ids else token_id)
            return  # the stop token's text is not part of the completion
        if self.decoder is not None:
            searched = max(0, len(self.text) - self._holdback)
            self.text += self.decoder.step(token_id)
            if self.params.stop_strings and self._check_stop_strings(searched):
                return
        if self.num_tokens >= self._max_len:
            self.finish("length")

    def _check_stop_strings(self, start: int) -> bool:
        # A new match must end inside the new text, so it starts at most (longest stop - 1)
        # characters before it: only that tail is searched.
        best = None
        for s in self.params.stop_strings:
            i = self.text.find(s, start)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return False
        i, s = best
        self.text = self.text[: i + len(s) if self.params.include_stop_str_in_output else i]
        self.finish("stop", s, flush=False)
        return True

    def finish(self, reason: str, stop_reason: int | str | None = None, flush: bool = True) -> None:
        if flush and self.decoder is not None and reason != "abort":
            self.text += self.decoder.flush()
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason

    def completion(self) -> CompletionOutput:
        """Cumulative output plus what is new since the previous call (streaming deltas).

        While stop strings could still match, the last (longest stop - 1) characters are held back
        so that streamed text never has to be taken back.
        """
        visible = len(self.text) if self.is_finished else max(self.num_emitted_chars, len(self.text) - self._holdback)
        delta_text = self.text[self.num_emitted_chars:visible]
        out_ids = self.output_token_ids
        delta_ids = out_ids[self.num_emitted_tokens:]
        self.num_emitted_chars, self.num_emitted_tokens = visible, len(out_ids)
        return CompletionOutput(
            index=self.index, text=self.text[:visible], token_ids=out_ids,
            cumulative_logprob=self.cumulative_logprob if self.logprobs is not None else None,
            logprobs=list(self.logprobs) if self.logprobs is not None else None,
            finish_reason=self.finish_reason, stop_reason=self.stop_reason,
            delta_text=delta_text, delta_token_ids=delta_ids,
        )


class SequenceGroup:
    """One request: a prompt and its n samples (GRPO's G), finished when every sample is."""

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                 params: SamplingParams, seqs: list[Sequence]):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.seqs = seqs

    @property
    def is_finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)

    def output(self) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id, prompt=self.prompt, prompt_token_ids=self.prompt_token_ids,
            outputs=[s.completion() for s in self.seqs], finished=self.is_finished,
            num_cached_tokens=self.seqs[0].num_cached_tokens,
        )
