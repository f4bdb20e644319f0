"""KV block accounting: which block ids are free, which request holds which blocks.

Pure bookkeeping; the tensors live in the executor. Allocation is deterministic (lowest free
id first), so tests can assert exact block ids.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

from runtime.core.ids import BlockId, RequestId


class OutOfBlocksError(RuntimeError):
    pass


class BlockPool:
    """A fixed set of block ids [0, num_blocks)."""

    def __init__(self, num_blocks: int):
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: list[int] = list(range(num_blocks))  # a min-heap
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def allocate(self, n: int) -> list[BlockId]:
        if n > len(self._free):
            raise OutOfBlocksError(f"need {n} blocks, {len(self._free)} free")
        out = [BlockId(heapq.heappop(self._free)) for _ in range(n)]
        self._used.update(out)
        return out

    def resize(self, num_blocks: int) -> None:
        """Grow, or shrink when every id >= num_blocks is free (compact first)."""
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        if num_blocks >= self.num_blocks:
            for b in range(self.num_blocks, num_blocks):
                heapq.heappush(self._free, b)
        else:
            busy = [b for b in self._used if b >= num_blocks]
            if busy:
                raise ValueError(f"cannot shrink to {num_blocks}: blocks {sorted(busy)[:5]} are in use")
            self._free = [b for b in self._free if b < num_blocks]
            heapq.heapify(self._free)
        self.num_blocks = num_blocks

    def free(self, blocks: Sequence[BlockId]) -> None:
        for b in blocks:
            if b not in self._used:
                raise ValueError(f"block {b} is not allocated")
            self._used.remove(b)
            heapq.heappush(self._free, b)


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


class KVCacheManager:
    """Per-request block tables over one BlockPool. Answers "fits or not" and hands out slots."""

    def __init__(self, pool: BlockPool, block_size: int):
        if block_size <= 0:
            raise ValueError(f"block_size must be > 0, got {block_size}")
        self.pool = pool
        self.block_size = block_size
        self._tables: dict[RequestId, list[BlockId]] = {}

    def block_table(self, rid: RequestId) -> list[BlockId]:
        return self._tables.get(rid, [])

    def blocks_needed(self, rid: RequestId, total_tokens: int) -> int:
        """Additional blocks `rid` needs to hold `total_tokens` tokens."""
        return max(0, blocks_for(total_tokens, self.block_size) - len(self._tables.get(rid, ())))

    def can_allocate(self, rid: RequestId, total_tokens: int) -> bool:
        return self.blocks_needed(rid, total_tokens) <= self.pool.num_free

    def allocate(self, rid: RequestId, total_tokens: int) -> list[BlockId]:
        """Grow rid's table to hold total_tokens; returns the new blocks."""
        new = self.pool.allocate(self.blocks_needed(rid, total_tokens))
        self._tables.setdefault(rid, []).extend(new)
        return new

    def free(self, rid: RequestId) -> int:
        blocks = self._tables.pop(rid, [])
        self.pool.free(blocks)
        return len(blocks)

    def compact(self, num_blocks: int) -> list[tuple[BlockId, BlockId]]:
        """Move blocks with ids >= num_blocks to free lower ids and shrink the pool to
        num_blocks. Returns the (old, new) moves; the caller copies the KV data."""
        if self.pool.num_used > num_blocks:
            raise ValueError(f"cannot compact to {num_blocks} blocks: {self.pool.num_used} in use")
        moves: list[tuple[BlockId, BlockId]] = []
        for rid in sorted(self._tables):
            table = self._tables[rid]
            for i, b in enumerate(table):
                if b >= num_blocks:
                    (new,) = self.pool.allocate(1)  # lowest free id: always < num_blocks here
                    self.pool.free([b])
                    table[i] = new
                    moves.append((b, new))
        self.pool.resize(num_blocks)
        return moves

    @property
    def num_requests(self) -> int:
        return len(self._tables)
