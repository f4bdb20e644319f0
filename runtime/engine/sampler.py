"""Token sampling: greedy, temperature, top-p, per-request seeded generators, OpenAI's logit
adjustments (logit_bias, presence and frequency penalties) and a grammar's mask."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from runtime.core.request import SamplingParams


def adjusted(row: Tensor, p: SamplingParams, generated: Sequence[int]) -> Tensor:
    """One row of logits (float32, a copy) after ``p``'s bias and penalties, given the tokens the
    request has generated so far (OpenAI's definition: logit - count x frequency - (count > 0) x
    presence; the bias is added first)."""
    row = row.float().clone()
    if p.logit_bias:
        ids, bias = zip(*p.logit_bias, strict=True)
        row.index_add_(0, torch.tensor(ids, dtype=torch.long), torch.tensor(bias, dtype=row.dtype))
    if p.penalized and generated:
        ids_t, counts = torch.unique(torch.tensor(generated, dtype=torch.long), return_counts=True)
        row.index_add_(0, ids_t, -(counts.to(row.dtype) * p.frequency_penalty + p.presence_penalty))
    return row


def sample(logits: Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
           generated: Sequence[Sequence[int]] | None = None,
           allowed: Sequence[Tensor | None] | None = None) -> list[int]:
    """One token per row. Greedy rows use argmax (what HF generate(do_sample=False) does).
    ``generated[i]``: row i's generated tokens, needed only for rows with penalties;
    ``allowed[i]``: the tokens row i may sample (a grammar's mask), None for any."""
    out = logits.argmax(dim=-1).tolist()
    for i, p in enumerate(params):
        mask = allowed[i] if allowed is not None else None
        if p.greedy and not p.adjusts_logits and mask is None:
            continue
        row = adjusted(logits[i], p, generated[i] if generated is not None else ()) if p.adjusts_logits else logits[i]
        if mask is not None:
            row = row.float().masked_fill(~mask, -math.inf)
        if p.greedy:
            out[i] = int(row.argmax())
            continue
        probs = torch.softmax(row.float() / p.temperature, dim=-1)
        if p.top_p < 1.0:
            sorted_p, idx = probs.sort(descending=True)
            keep = sorted_p.cumsum(0) - sorted_p < p.top_p  # always keeps the top token
            sorted_p = sorted_p * keep
            choice = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=generators[i])
            out[i] = int(idx[choice])
        else:
            out[i] = int(torch.multinomial(probs, 1, generator=generators[i]))
    return out
