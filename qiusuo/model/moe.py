"""DeepSeekMoE: shared experts plus routed experts behind a sigmoid (or softmax) top-k router.

- Routing (DeepSeek-V3 report, arXiv 2412.19437 §2.1; the V2 report, arXiv 2405.04434, for the
  softmax gate): scores in fp32; `e_score_correction_bias` is added for expert *selection* only; group-limited top-k keeps the `topk_group` groups with the best
  sum-of-top-2 scores; gate weights are the unbiased scores of the chosen experts, normalised
  when `norm_topk_prob`, times `routed_scaling_factor`.
- Auxiliary-loss-free balancing (V3 report §2.1.2): training forwards count tokens per expert; the trainer
  calls `Transformer.update_router_bias()` after each optimizer step, which moves each bias by
  gamma * sign(mean load - load) and clears the counts.
- Optional sequence-wise balance loss (V3 report §2.1.2, alpha = `aux_loss_alpha`), stored on the module
  after a training forward.
- Experts are stored stacked (E, ...) and computed by sorting the (token, slot) pairs by expert:
  one gather, one matmul pair per *expert*, one scatter-add. No Python loop over tokens.
  `forward_reference` keeps the per-expert `torch.where` loop of the reference code as the test oracle.
- Under `torch.compile` (the engine's compiled decode) the sort-by-expert path cannot be traced:
  its split sizes depend on the routing. `forward_gathered` computes the same sum with each
  token's K experts' weights indexed directly; inductor fuses the indexing into the matmul loops,
  so nothing (N, K, 2I, D)-sized is materialised and every expert not chosen is never read.

Dimension letters (the package's legend, qiusuo/model/__init__.py): N flattened tokens,
D hidden, E routed experts, K experts per token, I moe_intermediate_size, Ng expert groups.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .layers import MLP


class Router(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        E = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.scoring_func = config.scoring_func
        self.weight = nn.Parameter(torch.empty(E, config.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(E, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, D) -> scores (N, E) fp32, topk_idx (N, K), topk_weight (N, K) fp32."""
        logits = F.linear(x.float(), self.weight.float())  # (N, E)
        scores = logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores.detach() + self.e_score_correction_bias  # bias steers selection only
        if self.n_group > 1:
            N, E = choice.shape
            grouped = choice.view(N, self.n_group, E // self.n_group)  # (N, Ng, E/Ng)
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # (N, Ng)
            keep = group_scores.topk(self.topk_group, dim=-1).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            choice = grouped.masked_fill(~group_mask[..., None], float("-inf")).view(N, E)
        topk_idx = choice.topk(self.top_k, dim=-1).indices  # (N, K)
        topk_weight = scores.gather(1, topk_idx)
        if self.norm_topk_prob:
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
        return scores, topk_idx, topk_weight * self.routed_scaling_factor


class Experts(nn.Module):
    """E SwiGLU experts stored stacked, as transformers 5 holds them in memory."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down_proj[e])

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
        """x (N, D), topk_idx/topk_weight (N, K) -> (N, D), grouped by expert."""
        if torch.compiler.is_compiling():
            return self.forward_gathered(x, topk_idx, topk_weight)
        N, K = topk_idx.shape
        flat = topk_idx.reshape(-1)  # (N*K,) expert of each (token, slot)
        order = flat.argsort(stable=True)
        token_of = order // K  # (N*K,) token of each sorted slot
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        x_sorted = x[token_of]  # (N*K, D), grouped by expert
        outs = [self.expert(e, chunk) for e, chunk in enumerate(x_sorted.split(counts)) if counts[e]]
        y_sorted = torch.cat(outs) * topk_weight.reshape(-1)[order, None].to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token_of, y_sorted)

    def forward_gathered(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
        """The same function with no data-dependent shapes (for torch.compile)."""
        gate_up = torch.einsum("nd,nkfd->nkf", x, self.gate_up_proj[topk_idx])  # (N, K, 2I)
        gate, up = gate_up.chunk(2, dim=-1)
        y = torch.einsum("nki,nkdi->nkd", F.silu(gate) * up, self.down_proj[topk_idx])  # (N, K, D)
        return (y * topk_weight[..., None].to(x.dtype)).sum(dim=1)

    def forward_reference(self, x, topk_idx, topk_weight):
        """The reference code's per-expert `torch.where` loop; the test oracle for `forward`."""
        y = torch.zeros_like(x)
        for e in range(self.num_experts):
            token, slot = torch.where(topk_idx == e)
            if token.numel():
                y[token] += self.expert(e, x[token]) * topk_weight[token, slot, None].to(x.dtype)
        return y


class MoE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_experts = E = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.aux_loss_alpha = config.aux_loss_alpha
        self.gate = Router(config)
        self.experts = Experts(E, config.hidden_size, config.moe_intermediate_size)
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts
            else None
        )
        # Tokens routed to each expert since the last bias update (training forwards only).
        self.register_buffer("expert_load", torch.zeros(E), persistent=False)
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, reference: bool = False) -> torch.Tensor:
        B, T, D = x.shape
        flat = x.reshape(B * T, D)  # (N, D)
        scores, topk_idx, topk_weight = self.gate(flat)
        experts = self.experts.forward_reference if reference else self.experts
        y = experts(flat, topk_idx, topk_weight).view(B, T, D)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        if self.training:
            with torch.no_grad():
                self.expert_load += torch.bincount(topk_idx.reshape(-1), minlength=self.num_experts)
            if self.aux_loss_alpha > 0:
                self.aux_loss = self._sequence_balance_loss(scores.view(B, T, -1), topk_idx.view(B, T, -1))
        return y

    def _sequence_balance_loss(self, scores, topk_idx):
        """V3's complementary sequence-wise loss: alpha * sum_i f_i * P_i, averaged over sequences.

        scores (B, T, E), topk_idx (B, T, K); f uses the actual routed selection (held constant).
        """
        B, T, E = scores.shape
        counts = torch.zeros(B, E, device=scores.device).scatter_add_(
            1, topk_idx.reshape(B, -1), torch.ones(B, T * self.top_k, device=scores.device)
        )  # (B, E)
        f = counts * E / (self.top_k * T)
        p = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)  # (B, E)
        return self.aux_loss_alpha * (f.detach() * p).sum(dim=-1).mean()

    @torch.no_grad()
    def update_bias(self, gamma: float, load: torch.Tensor | None = None) -> dict[str, float]:
        """b_i += gamma * sign(mean load - load_i); returns the max/mean load it balanced."""
        load = self.expert_load if load is None else load
        stats = {"max_over_mean": float(load.max() / load.mean().clamp(min=1e-9))}
        if load.sum() > 0:
            self.gate.e_score_correction_bias += gamma * torch.sign(load.mean() - load)
        self.expert_load.zero_()
        return stats
