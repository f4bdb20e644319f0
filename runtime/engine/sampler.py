"""Token sampling: greedy, temperature, top-p, per-request seeded generators."""

from __future__ import annotations

import torch
from torch import Tensor

from runtime.core.request import SamplingParams


def sample(logits: Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """One token per row. Greedy rows use argmax (what HF generate(do_sample=False) does)."""
    out = logits.argmax(dim=-1).tolist()
    for i, p in enumerate(params):
        if p.greedy:
            continue
        row = logits[i].float() / p.temperature
        probs = torch.softmax(row, dim=-1)
        if p.top_p < 1.0:
            sorted_p, idx = probs.sort(descending=True)
            keep = sorted_p.cumsum(0) - sorted_p < p.top_p  # always keeps the top token
            sorted_p = sorted_p * keep
            choice = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=generators[i])
            out[i] = int(idx[choice])
        else:
            out[i] = int(torch.multinomial(probs, 1, generator=generators[i]))
    return out
