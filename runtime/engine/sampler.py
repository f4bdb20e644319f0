"""Token sampling: greedy, temperature, top-p, per-request seeded generators, OpenAI's logit
adjustments (logit_bias, presence and frequency penalties) and a grammar's mask."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from runtime.core.request import SamplingParams

Bias = tuple[Tensor, Tensor]  # a request's logit_bias as (token ids, values), built once


def bias_tensors(p: SamplingParams) -> Bias | None:
    """``p.logit_bias`` as tensors: built once per request (the engine keeps them), since a
    vocabulary-wide bias rebuilt every step would cost the shared device ~25 ms a token."""
    if not p.logit_bias:
        return None
    ids, values = zip(*p.logit_bias, strict=True)
    return torch.tensor(ids, dtype=torch.long), torch.tensor(values, dtype=torch.float32)


def adjusted(row: Tensor, p: SamplingParams, generated: Sequence[int], bias: Bias | None = None) -> Tensor:
    """One row of logits (float32, a copy) after ``p``'s bias and penalties, given the tokens the
    request has generated so far (OpenAI's definition: logit - count x frequency - (count > 0) x
    presence; the bias is added first)."""
    row = row.float().clone()
    bias = bias if bias is not None else bias_tensors(p)
    if bias is not None:
        row.index_add_(0, bias[0], bias[1])
    if p.penalized and generated:
        ids_t, counts = torch.unique(torch.tensor(generated, dtype=torch.long), return_counts=True)
        row.index_add_(0, ids_t, -(counts.to(row.dtype) * p.frequency_penalty + p.presence_penalty))
    return row


def sample(logits: Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
           generated: Sequence[Sequence[int]] | None = None,
           allowed: Sequence[Tensor | None] | None = None,
           biases: Sequence[Bias | None] | None = None) -> list[int]:
    """One token per row. Greedy rows use argmax (what HF generate(do_sample=False) does).
    ``generated[i]``: row i's generated tokens, needed only for rows with penalties;
    ``allowed[i]``: the tokens row i may sample (a grammar's mask), None for any;
    ``biases[i]``: row i's ``bias_tensors`` (built here when not given)."""
    out = logits.argmax(dim=-1).tolist()
    for i, p in enumerate(params):
        mask = allowed[i] if allowed is not None else None
        if p.greedy and not p.adjusts_logits and mask is None:
            continue
        if p.adjusts_logits:
            row = adjusted(logits[i], p, generated[i] if generated is not None else (),
                           biases[i] if biases is not None else None)
        else:
            row = logits[i]
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
