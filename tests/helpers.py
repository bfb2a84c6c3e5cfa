"""Helpers shared by test modules (imported as `helpers`: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import torch


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
