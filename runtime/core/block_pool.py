"""KV block accounting: which block ids are free, which requests hold which blocks, and which
freed blocks still hold a prompt prefix worth reusing.

Pure bookkeeping; the tensors live in the executor. Allocation is deterministic (lowest free
id first), so tests can assert exact block ids.

Prefix caching (as vLLM's automatic prefix caching): a block whose tokens are all computed is
named by a digest of its tokens and of every token before it. When a request starts, the blocks of
the longest run of its full leading blocks already named are shared with it (a reference count
each) and its prefill starts after them: an LLM function's requests share its system prompt, a
chat shares its history, and a preempted request finds its own blocks again. A block no request
holds keeps its name and its KV until an allocation needs the room (least recently freed first),
so cached blocks count as free in the pool. (On a shared device the memory they sit in is lent:
runtime.device takes it back before another instance goes short.)
"""

from __future__ import annotations

import hashlib
import heapq
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from runtime.core.ids import BlockId, RequestId

BlockHash = bytes  # 16-byte blake2b digest of a block's tokens and its parent's name


class OutOfBlocksError(RuntimeError):
    pass


class BlockPool:
    """A fixed set of block ids [0, num_blocks): free, held (reference counted) or cached (free,
    but still holding the KV of a named prefix block)."""

    def __init__(self, num_blocks: int):
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: list[int] = list(range(num_blocks))  # a min-heap
        self._refs: dict[int, int] = {}  # held blocks -> holders
        self._cached: OrderedDict[int, None] = OrderedDict()  # free but named, least recent first
        self._name: dict[int, BlockHash] = {}  # named blocks (held or cached) -> name
        self._by_name: dict[BlockHash, int] = {}
        self._extra_refs = 0  # holders beyond the first, over all held blocks

    @property
    def num_free(self) -> int:
        """Blocks an allocation may take, cached ones included."""
        return len(self._free) + len(self._cached)

    @property
    def num_used(self) -> int:
        return len(self._refs)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    @property
    def shared_extra(self) -> int:
        """How many more blocks the requests' tables name than are held: a block shared by k
        requests is counted k times in their reservations, and held once."""
        return self._extra_refs

    def is_held(self, b: BlockId) -> bool:
        return b in self._refs

    def allocate(self, n: int) -> list[BlockId]:
        if n > self.num_free:
            raise OutOfBlocksError(f"need {n} blocks, {self.num_free} free")
        out: list[BlockId] = []
        for _ in range(n):
            if self._free:
                b = heapq.heappop(self._free)
            else:  # evict the least recently freed cached block
                b, _ = self._cached.popitem(last=False)
                self._unname(b)
            self._refs[b] = 1
            out.append(BlockId(b))
        return out

    def free(self, blocks: Sequence[BlockId]) -> None:
        """Drop one reference to each block; a block nobody holds becomes free, or cached when
        it is named. Blocks are released last first, so a request's tail is evicted before the
        prefix it extends."""
        for b in blocks:
            if b not in self._refs:
                raise ValueError(f"block {b} is not allocated")
        for b in reversed(blocks):
            self._refs[b] -= 1
            if self._refs[b] > 0:
                self._extra_refs -= 1
            else:
                del self._refs[b]
                if b in self._name:
                    self._cached[b] = None
                else:
                    heapq.heappush(self._free, b)

    # -- named blocks ------------------------------------------------------------------------
    def lookup(self, name: BlockHash) -> BlockId | None:
        b = self._by_name.get(name)
        return None if b is None else BlockId(b)

    def name_of(self, b: BlockId) -> BlockHash:
        return self._name[b]

    def share(self, b: BlockId) -> None:
        """One more holder of a named block (held already, or cached)."""
        if b in self._refs:
            self._refs[b] += 1
            self._extra_refs += 1
        elif b in self._cached:
            del self._cached[b]
            self._refs[b] = 1
        else:
            raise ValueError(f"block {b} is neither held nor cached")

    def name(self, b: BlockId, name: BlockHash) -> None:
        """Name a held block whose tokens are all computed. A name already given to another
        block stays with that one (the same KV twice; this copy is freed plainly)."""
        if b not in self._refs:
            raise ValueError(f"block {b} is not allocated")
        if name not in self._by_name and b not in self._name:
            self._by_name[name] = b
            self._name[b] = name

    def _unname(self, b: int) -> None:
        name = self._name.pop(b, None)
        if name is not None:
            del self._by_name[name]

    # -- size --------------------------------------------------------------------------------
    def resize(self, num_blocks: int) -> None:
        """Grow, or shrink when no held id is >= num_blocks (compact first); cached blocks
        there are dropped."""
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        if num_blocks >= self.num_blocks:
            for b in range(self.num_blocks, num_blocks):
                heapq.heappush(self._free, b)
        else:
            busy = [b for b in self._refs if b >= num_blocks]
            if busy:
                raise ValueError(f"cannot shrink to {num_blocks}: blocks {sorted(busy)[:5]} are in use")
            for b in [b for b in self._cached if b >= num_blocks]:
                del self._cached[b]
                self._unname(b)
            self._free = [b for b in self._free if b < num_blocks]
            heapq.heapify(self._free)
        self.num_blocks = num_blocks

    def take_below(self, limit: int) -> BlockId:
        """A block with id < limit for compaction: the lowest free one, else the least recently
        freed cached one below limit (its prefix is dropped)."""
        if self._free and self._free[0] < limit:
            b = heapq.heappop(self._free)
        else:
            b = next((c for c in self._cached if c < limit), -1)
            if b < 0:
                raise OutOfBlocksError(f"no free block below {limit}")
            del self._cached[b]
            self._unname(b)
        self._refs[b] = 1
        return BlockId(b)

    def relocate_cached(self, limit: int) -> list[tuple[BlockId, BlockId]]:
        """Before a shrink to ``limit`` (every held block already below it): keep the most
        recently freed cached blocks that fit beside the held ones, moving those at or above
        ``limit`` into free ids below; drop the rest. Each kept block keeps its place in the
        eviction order. Returns the (old, new) moves."""
        room = max(0, limit - len(self._refs))
        order = list(self._cached)
        keep = set(order[len(order) - room:]) if room else set()
        for b in order:
            if b not in keep:
                del self._cached[b]
                self._unname(b)
                heapq.heappush(self._free, b)
        moves: dict[int, int] = {}
        for b in reversed(self._cached):
            if b >= limit:
                new = heapq.heappop(self._free)  # below limit: the kept ones fit there by count
                name = self._name.pop(b)
                self._name[new] = name
                self._by_name[name] = new
                heapq.heappush(self._free, b)
                moves[b] = new
        if moves:
            self._cached = OrderedDict((moves.get(b, b), None) for b in self._cached)
        return [(BlockId(a), BlockId(b)) for a, b in moves.items()]

    def move(self, old: BlockId, new: BlockId) -> None:
        """Compaction: held block ``old`` becomes ``new`` (from take_below; its reference is
        replaced by old's holders); old is freed. Its name goes with it."""
        refs = self._refs.pop(old)
        self._refs[new] = refs
        name = self._name.pop(old, None)
        if name is not None:
            self._name[new] = name
            self._by_name[name] = new
        heapq.heappush(self._free, old)


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


def block_names(token_ids: Sequence[int], block_size: int, parent: BlockHash | None = None) -> list[BlockHash]:
    """The names of the full blocks of token_ids, each a digest of its tokens and its parent's
    name (so a name stands for the whole prefix up to the end of its block). A cryptographic
    digest: with Python's hash a crafted prompt could collide with another's prefix and have its
    KV served to that request."""
    out: list[BlockHash] = []
    for i in range(0, len(token_ids) - block_size + 1, block_size):
        h = hashlib.blake2b(parent or b"", digest_size=16)
        h.update(array("q", token_ids[i:i + block_size]).tobytes())
        parent = h.digest()
        out.append(parent)
    return out


@dataclass(frozen=True)
class PrefixHit:
    """What a prompt would find in an instance's prefix cache if it started now: the leading
    tokens it would not compute, and how many of their blocks other requests hold already (it
    shares those without taking memory)."""

    tokens: int = 0
    held_blocks: int = 0


NO_HIT = PrefixHit()


class KVCacheManager:
    """Per-request block tables over one BlockPool. Answers "fits or not" and hands out slots."""

    def __init__(self, pool: BlockPool, block_size: int, prefix_caching: bool = True):
        if block_size <= 0:
            raise ValueError(f"block_size must be > 0, got {block_size}")
        self.pool = pool
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._tables: dict[RequestId, list[BlockId]] = {}
        self._names: dict[RequestId, list[BlockHash]] = {}  # names of each table's leading full blocks
        self.hit_tokens = 0  # prompt tokens served from cached blocks, ever
        self.queried_tokens = 0  # prompt tokens looked up, ever

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

    def cached_prefix(self, token_ids: Sequence[int]) -> list[BlockId]:
        """The cached blocks of the longest cached prefix of token_ids, full blocks only and
        never the last token (the step that computes it samples the first new one)."""
        if not self.prefix_caching:
            return []
        hits: list[BlockId] = []
        for name in block_names(token_ids[: len(token_ids) - 1], self.block_size):
            b = self.pool.lookup(name)
            if b is None:
                break
            hits.append(b)
        return hits

    def prefix_hit(self, token_ids: Sequence[int]) -> PrefixHit:
        hits = self.cached_prefix(token_ids)
        return PrefixHit(len(hits) * self.block_size, sum(self.pool.is_held(b) for b in hits))

    def match_prefix(self, rid: RequestId, token_ids: Sequence[int]) -> int:
        """Start rid's table with the blocks of its longest cached prefix, shared; returns the
        tokens they hold (a multiple of the block size)."""
        if rid in self._tables:
            raise ValueError(f"request {rid!r} already has blocks")
        if not self.prefix_caching:
            return 0
        hits = self.cached_prefix(token_ids)
        self.queried_tokens += len(token_ids)
        for b in hits:
            self.pool.share(b)
        if hits:
            self._tables[rid] = hits
            self._names[rid] = [self.pool.name_of(b) for b in hits]
        matched = len(hits) * self.block_size
        self.hit_tokens += matched
        return matched

    def unmatch(self, rid: RequestId, prompt_tokens: int) -> None:
        """Undo a match_prefix for a request that could not start after all (it matches again
        when it does): its shared blocks go back and the counts forget it."""
        matched = len(self._tables.get(rid, ())) * self.block_size
        self.free(rid)
        if self.prefix_caching:
            self.hit_tokens -= matched
            self.queried_tokens -= prompt_tokens

    def commit(self, rid: RequestId, tokens: Callable[[int, int], Sequence[int]], computed_tokens: int) -> None:
        """Name rid's blocks that are full of computed tokens (``tokens(start, end)`` gives its
        token ids), so later requests with the same prefix can share them."""
        if not self.prefix_caching:
            return
        table = self._tables.get(rid)
        if not table:
            return
        names = self._names.setdefault(rid, [])
        full = min(computed_tokens // self.block_size, len(table))
        if full <= len(names):
            return
        start = len(names) * self.block_size
        new = block_names(tokens(start, full * self.block_size), self.block_size, names[-1] if names else None)
        for i, name in enumerate(new, start=len(names)):
            self.pool.name(table[i], name)
        names.extend(new)

    def free(self, rid: RequestId) -> int:
        blocks = self._tables.pop(rid, [])
        self._names.pop(rid, None)
        self.pool.free(blocks)
        return len(blocks)

    def compact(self, num_blocks: int) -> list[tuple[BlockId, BlockId]]:
        """Move held blocks with ids >= num_blocks to free lower ids, then cached ones while free
        ids are left, and shrink the pool to num_blocks (cached blocks still above it are
        dropped). Returns the (old, new) moves; the caller copies the KV data. A block shared by
        several requests moves once."""
        if self.pool.num_used > num_blocks:
            raise ValueError(f"cannot compact to {num_blocks} blocks: {self.pool.num_used} in use")
        moved: dict[BlockId, BlockId] = {}
        for rid in sorted(self._tables):
            table = self._tables[rid]
            for i, b in enumerate(table):
                if b < num_blocks:
                    continue
                if b not in moved:
                    new = self.pool.take_below(num_blocks)
                    self.pool.move(b, new)
                    moved[b] = new
                table[i] = moved[b]
        moves = list(moved.items()) + self.pool.relocate_cached(num_blocks)
        self.pool.resize(num_blocks)
        return moves

    @property
    def num_requests(self) -> int:
        return len(self._tables)
