"""Executes a StepPlan on the model: builds the flat token batch, runs the forward pass.

Owns the KV tensors; block ids come from the scheduler's plan.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from runtime.core.ids import RequestId
from runtime.core.scheduler import ScheduledSeq, StepPlan
from runtime.models.llama import ForwardBatch, LlamaModel, PagedKVCache, PrefillSegment, prefix_mask


class ModelRunner:
    def __init__(self, model: LlamaModel, cache: PagedKVCache):
        self.model = model
        self.cache = cache

    def execute(self, plan: StepPlan, score: Mapping[RequestId, int] | None = None
                ) -> tuple[list[RequestId], Tensor, dict[RequestId, tuple[int, Tensor]]]:
        """Run one step. Returns the ids that sample this step, their logits [S, vocab], and for
        the requests in ``score`` (rid -> the first position whose logits are wanted) the logits
        this step computed at that position and after, up to the last known token's (which is
        the sample row): {rid: (first position, logits [n, vocab])}. Prompt logprobs use them."""
        batch, sample_ids, scored = self.build_batch(plan, score)
        logits = self.model.forward(batch, self.cache)
        n, out = len(sample_ids), {}
        for rid, first, rows in scored:
            out[rid] = (first, logits[n:n + rows])
            n += rows
        return sample_ids, logits[:len(sample_ids)], out

    def build_batch(self, plan: StepPlan, score: Mapping[RequestId, int] | None = None
                    ) -> tuple[ForwardBatch, list[RequestId], list[tuple[RequestId, int, int]]]:
        bs = self.cache.block_size
        decode = [s for s in plan.seqs if len(s.token_ids) == 1]
        prefill = [s for s in plan.seqs if len(s.token_ids) > 1]
        ids: list[int] = []
        pos: list[int] = []
        slots: list[Tensor] = []
        logit_rows: list[int] = []
        sample_ids: list[RequestId] = []

        def emit(s: ScheduledSeq) -> None:
            if s.sample:
                logit_rows.append(len(ids) + len(s.token_ids) - 1)
                sample_ids.append(s.rid)
            ids.extend(s.token_ids)
            pos.extend(range(s.start_pos, s.start_pos + len(s.token_ids)))

        bt = mask = None
        ctx_len = 0
        if decode:
            lens = [s.start_pos + 1 for s in decode]
            max_blocks = max(len(s.block_ids) for s in decode)
            table = [list(s.block_ids) + [0] * (max_blocks - len(s.block_ids)) for s in decode]
            bt = torch.tensor(table, dtype=torch.long)
            for s in decode:
                emit(s)
            p = torch.tensor([s.start_pos for s in decode], dtype=torch.long)
            slots.append(bt.gather(1, (p // bs).unsqueeze(1)).squeeze(1) * bs + p % bs)
            if len(set(lens)) == 1:
                ctx_len = lens[0]
            else:
                mask = (torch.arange(max_blocks * bs)[None, :] < torch.tensor(lens)[:, None]).view(
                    len(decode), 1, 1, -1
                )
        segs: list[PrefillSegment] = []
        extra: list[int] = []  # rows of scored positions, after the sample rows
        scored: list[tuple[RequestId, int, int]] = []  # (rid, first position, rows)
        for s in prefill:
            start = len(ids)
            want = score.get(s.rid) if score else None
            if want is not None:  # every position of the chunk from `want` on, but the sample row
                first = max(want, s.start_pos)
                last = s.start_pos + len(s.token_ids) - (1 if s.sample else 0)
                if last > first:
                    extra.extend(range(start + first - s.start_pos, start + last - s.start_pos))
                    scored.append((s.rid, first, last - first))
            emit(s)
            t = len(s.token_ids)
            blocks = torch.tensor(s.block_ids, dtype=torch.long)
            p = torch.arange(s.start_pos, s.start_pos + t)
            slots.append(blocks[p // bs] * bs + p % bs)
            segs.append(PrefillSegment(
                start=start, end=start + t, block_ids=blocks, context_len=s.start_pos + t,
                mask=None if s.start_pos == 0 else prefix_mask(s.start_pos, t),
            ))
        batch = ForwardBatch(
            input_ids=torch.tensor(ids, dtype=torch.long),
            positions=torch.tensor(pos, dtype=torch.long),
            slot_mapping=torch.cat(slots),
            num_decode=len(decode),
            decode_block_tables=bt,
            decode_mask=mask,
            decode_context_len=ctx_len,
            prefills=tuple(segs),
            logits_indices=torch.tensor(logit_rows + extra, dtype=torch.long),
        )
        return batch, sample_ids, scored
