"""Where an MoE model sends tokens, and whether training moved it: expert-load balance and routing change.

Both figures are read teacher-forced on fixed token rows (e.g. a model's greedy completions of held-out
problems), in eval mode (no expert-load counting, no bias update), with each router's own selection rule
(its `e_score_correction_bias` included):

- balance, per MoE layer: max / mean tokens per routed expert over the marked tokens (1.0: every expert
  takes the same share; E / K: every token goes to the same K experts). The figure the trainer logs as
  `moe_load_max_over_mean`, here on chosen rows instead of training batches.
- change, per MoE layer: the fraction of marked tokens whose top-k expert *set* differs between two
  models on the same rows (order within the set and gate weights do not count). Under RL the rows stay
  fixed, so a change comes from the weights or the router biases the RL stage moved.

Dimension letters (qiusuo/model/__init__.py): B rows, S positions, N marked tokens, K experts per token,
E routed experts.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch


@torch.no_grad()
def routed_experts(model, input_ids: torch.Tensor, mask: torch.Tensor, chunk: int = 128) -> list[torch.Tensor]:
    """Each MoE layer's chosen experts for the tokens where `mask` is set: a list (one per MoE layer, in
    depth order; MTP heads excluded) of (N, K) expert ids, sorted within each token. input_ids, mask: (B, S), right-padded
    (causal attention: padding after a token does not change its routing)."""
    assert input_ids.shape == mask.shape, (input_ids.shape, mask.shape)
    from qiusuo.model.moe import MoE

    # The main stack's MoE layers only: an MTP head's MoE (model.mtp) sees no tokens at inference.
    layers = [layer.mlp for layer in model.model.layers if isinstance(layer.mlp, MoE)]
    if not layers:
        raise ValueError("the model has no MoE layers (a dense preset?): routing figures need an MoE model")
    captured: list[list[torch.Tensor]] = [[] for _ in layers]
    keep = mask.bool()

    def hook(i):
        def grab(module, args, output):
            captured[i].append(output[1])  # topk_idx (B*S', K) of this chunk
        return grab

    handles = [m.gate.register_forward_hook(hook(i)) for i, m in enumerate(layers)]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, input_ids.shape[0], chunk):
            rows = slice(start, start + chunk)
            model.hidden_states(input_ids[rows].to(model.device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    flat_keep = keep.reshape(-1).to(input_ids.device)  # (B*S,) chunks are row blocks, so cat restores row order
    return [torch.cat(parts).cpu()[flat_keep.cpu()].sort(dim=-1).values for parts in captured]  # (N, K) each


def load_balance(topk: Sequence[torch.Tensor], num_experts: int) -> list[float]:
    """Per layer: max / mean tokens per routed expert, from (N, K) expert ids."""
    out = []
    for idx in topk:
        load = torch.bincount(idx.reshape(-1), minlength=num_experts).float()  # (E,)
        out.append(round(float(load.max() / load.mean().clamp(min=1e-9)), 4))
    return out


def routing_change(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> list[float]:
    """Per layer: the fraction of tokens whose top-k expert set differs between `a` and `b` (sorted (N, K)
    ids of the same tokens, from `routed_experts`)."""
    if len(a) != len(b):
        raise ValueError(f"the two models have {len(a)} and {len(b)} MoE layers; compare models of one config")
    out = []
    for x, y in zip(a, b):
        assert x.shape == y.shape, (x.shape, y.shape)
        changed = (x != y).any(dim=-1)  # (N,) sorted sets differ somewhere
        out.append(round(float(changed.float().mean()) if len(changed) else 0.0, 4))
    return out


def greedy_rows(llm, task, problems: Sequence[Any], max_tokens: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    """The greedy completions of `problems` by `llm`'s model as teacher-forcing rows: input_ids (B, S)
    prompt + completion, right-padded, and mask (B, S) set on the completion tokens."""
    from qiusuo.engine import SamplingParams
    from qiusuo.tasks.prompts import prompt_ids

    tokenizer = llm.get_tokenizer()
    outs = llm.generate([prompt_ids(tokenizer, task, p) for p in problems],
                        SamplingParams(temperature=0.0, max_tokens=max_tokens))
    rows = [(list(o.prompt_token_ids), list(o.outputs[0].token_ids)) for o in outs]
    S = max(len(p) + len(c) for p, c in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), S), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), S), dtype=torch.bool)
    for i, (p, c) in enumerate(rows):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        mask[i, len(p): len(p) + len(c)] = True
    return ids, mask


def routing_report(base, tuned, base_rows: tuple[torch.Tensor, torch.Tensor],
                   tuned_rows: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
    """Balance of each model on its own rows, and the routing change between the two models on each set of
    rows (e.g. base vs RL model on the base's and on the RL model's greedy held-out completions)."""
    from qiusuo.model.moe import MoE

    E = base.config.n_routed_experts
    base_on_base, base_on_tuned = routed_experts(base, *base_rows), routed_experts(base, *tuned_rows)
    tuned_on_base, tuned_on_tuned = routed_experts(tuned, *base_rows), routed_experts(tuned, *tuned_rows)
    change_base, change_tuned = routing_change(base_on_base, tuned_on_base), routing_change(base_on_tuned,
                                                                                              tuned_on_tuned)
    return {
        "moe_layers": [i for i, layer in enumerate(base.model.layers) if isinstance(layer.mlp, MoE)],
        "balance_max": E / base.config.num_experts_per_tok,  # every token on the same K experts
        "tokens": {"before": int(base_rows[1].sum()), "after": int(tuned_rows[1].sum())},
        "balance_before": load_balance(base_on_base, E),  # max/mean load per MoE layer, base on its completions
        "balance_after": load_balance(tuned_on_tuned, E),  # the tuned model on its own completions
        "changed_on_before": change_base,  # fraction of tokens whose top-k set changed, base's completions
        "changed_on_after": change_tuned,  # the same on the tuned model's completions
    }


def describe_routing(r: dict[str, Any]) -> str:
    """`routing_report`'s figures in three lines (what `qiusuo demo` prints on an MoE preset)."""
    def per_layer(xs, fmt):
        return " / ".join(format(x, fmt) for x in xs)
    return (f"MoE routing on the greedy held-out completions (MoE layers {per_layer(r['moe_layers'], 'd')}):\n"
            f"  expert load max/mean per layer: base {per_layer(r['balance_before'], '.2f')} -> "
            f"RL {per_layer(r['balance_after'], '.2f')} (1.00 is even, {r['balance_max']:.2f} all on K experts)\n"
            f"  tokens whose top-k expert set changed, base vs RL on the same tokens: "
            f"{per_layer(r['changed_on_before'], '.1%')} (base's completions), "
            f"{per_layer(r['changed_on_after'], '.1%')} (RL model's)")


__all__ = ["describe_routing", "greedy_rows", "load_balance", "routed_experts", "routing_change", "routing_report"]
