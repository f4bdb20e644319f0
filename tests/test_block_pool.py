import pytest

from runtime.core.block_pool import BlockPool, KVCacheManager, OutOfBlocksError, blocks_for
from runtime.core.ids import BlockId, RequestId


def test_allocation_is_deterministic_lowest_first():
    pool = BlockPool(4)
    assert pool.allocate(2) == [0, 1]
    pool.free([BlockId(0)])
    assert pool.allocate(2) == [0, 2]
    assert pool.num_free == 1 and pool.num_used == 3


def test_over_allocation_raises_and_changes_nothing():
    pool = BlockPool(2)
    with pytest.raises(OutOfBlocksError):
        pool.allocate(3)
    assert pool.num_free == 2


def test_double_free_is_an_error():
    pool = BlockPool(2)
    b = pool.allocate(1)
    pool.free(b)
    with pytest.raises(ValueError, match="not allocated"):
        pool.free(b)


@pytest.mark.parametrize("tokens,size,expected", [(0, 16, 0), (1, 16, 1), (16, 16, 1), (17, 16, 2), (33, 32, 2)])
def test_blocks_for(tokens, size, expected):
    assert blocks_for(tokens, size) == expected


def test_manager_grows_tables_and_frees_everything():
    kv = KVCacheManager(BlockPool(8), block_size=4)
    a, b = RequestId("a"), RequestId("b")
    assert kv.allocate(a, 5) == [0, 1]
    assert kv.allocate(b, 4) == [2]
    assert kv.allocate(a, 8) == []  # still fits in 2 blocks
    assert kv.allocate(a, 9) == [3]
    assert kv.block_table(a) == [0, 1, 3]
    assert kv.blocks_needed(b, 13) == 3
    assert not kv.can_allocate(b, 4 * 10)
    assert kv.free(a) == 3
    assert kv.free(b) == 1
    assert kv.pool.num_free == 8 and kv.num_requests == 0


def test_pool_grows_and_shrinks_only_over_free_ids():
    pool = BlockPool(2)
    pool.resize(4)
    assert pool.allocate(4) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="in use"):
        pool.resize(2)
    pool.free([BlockId(2), BlockId(3)])
    pool.resize(2)
    assert pool.num_blocks == 2 and pool.num_free == 0


def test_compaction_moves_high_blocks_down_and_keeps_tables_consistent():
    kv = KVCacheManager(BlockPool(8), block_size=4)
    a, b, c = RequestId("a"), RequestId("b"), RequestId("c")
    kv.allocate(a, 8)  # 0, 1
    kv.allocate(b, 12)  # 2, 3, 4
    kv.allocate(c, 12)  # 5, 6, 7
    kv.free(b)
    moves = kv.compact(5)
    assert moves == [(5, 2), (6, 3), (7, 4)]
    assert kv.block_table(c) == [2, 3, 4] and kv.block_table(a) == [0, 1]
    assert kv.pool.num_blocks == 5 and kv.pool.num_free == 0
    with pytest.raises(ValueError, match="in use"):
        kv.compact(4)


# -- prefix caching ------------------------------------------------------------------------------

def _tokens(seq):
    return lambda start, end: seq[start:end]


def _compute(kv, rid, prompt):
    """What the scheduler does for a request that runs its whole prompt: share its cached
    prefix, hold blocks for the rest, and name the full ones once computed."""
    matched = kv.match_prefix(rid, prompt)
    kv.allocate(rid, len(prompt))
    kv.commit(rid, _tokens(prompt), len(prompt))
    return matched


def test_a_named_block_freed_stays_cached_and_is_shared_by_the_next_request():
    kv = KVCacheManager(BlockPool(8), block_size=4)
    a, b = RequestId("a"), RequestId("b")
    prompt = list(range(100, 110))  # 10 tokens: two full blocks and a partial one
    assert kv.match_prefix(a, prompt) == 0
    kv.allocate(a, 10)  # 0, 1, 2
    kv.commit(a, _tokens(prompt), 10)  # names blocks 0 and 1 only: 2 is not full
    kv.free(a)
    assert kv.pool.num_cached == 2 and kv.pool.num_free == 8 and kv.pool.num_used == 0
    assert kv.match_prefix(b, prompt + [7, 8]) == 8  # both full blocks, found again
    assert kv.block_table(b) == [0, 1] and kv.pool.num_cached == 0
    assert kv.hit_tokens == 8


def test_the_last_prompt_token_is_always_computed():
    kv = KVCacheManager(BlockPool(8), block_size=4)
    prompt = list(range(8))
    _compute(kv, RequestId("a"), prompt)
    # the same 8 tokens again: block 2 of 2 would leave nothing to compute, so only block 1 is shared
    assert kv.match_prefix(RequestId("b"), prompt) == 4


def test_a_prefix_match_stops_at_the_first_difference_and_names_chain():
    kv = KVCacheManager(BlockPool(8), block_size=4)
    p = list(range(12))
    _compute(kv, RequestId("a"), p)
    other_first = [99] + p[1:] + [5]  # differs in block 0: block 1's tokens alone must not match
    assert kv.match_prefix(RequestId("b"), other_first) == 0
    second_differs = p[:4] + [99] + p[5:] + [5]
    assert kv.match_prefix(RequestId("c"), second_differs) == 4
    assert kv.pool.num_used == 3  # a's three, one of them shared with c


def test_cached_blocks_are_evicted_only_when_no_free_block_is_left_oldest_first():
    kv = KVCacheManager(BlockPool(4), block_size=2)
    for name, base in (("a", 10), ("b", 20)):
        p = [base, base + 1, base + 2]
        _compute(kv, RequestId(name), p)  # a: 0, 1; b: 2, 3
    kv.free(RequestId("a"))  # block 0 cached, 1 free
    kv.free(RequestId("b"))  # block 2 cached, 3 free
    assert kv.pool.allocate(2) == [1, 3]  # free ones first
    assert kv.pool.allocate(1) == [0]  # then a's, the older cached block
    assert kv.match_prefix(RequestId("x"), [10, 11, 12]) == 0  # a's prefix is gone
    assert kv.match_prefix(RequestId("y"), [20, 21, 22]) == 2  # b's is not


def test_compaction_moves_a_shared_block_once_and_keeps_cached_blocks_while_room_is_left():
    kv = KVCacheManager(BlockPool(12), block_size=2)
    a, b, c, filler = RequestId("a"), RequestId("b"), RequestId("c"), RequestId("f")
    kv.allocate(filler, 10)  # 0..4
    p = [1, 2, 3, 4, 5]
    _compute(kv, a, p)  # 5, 6, 7; 5 and 6 named
    assert kv.match_prefix(b, p) == 4 and kv.block_table(b) == [5, 6]
    kv.allocate(b, 5)  # 8
    q = [50, 51, 52]
    _compute(kv, c, q)  # 9, 10
    kv.free(c)  # 9 cached, 10 free
    kv.free(filler)
    assert kv.compact(5) == [(5, 0), (6, 1), (7, 2), (8, 3), (9, 4)]  # held ones, then the cached one
    assert kv.block_table(a) == [0, 1, 2] and kv.block_table(b) == [0, 1, 3]
    assert kv.pool.num_used == 4 and kv.pool.num_blocks == 5 and kv.pool.num_cached == 1
    assert kv.match_prefix(RequestId("d"), p) == 4  # the names moved with the blocks
    kv.free(RequestId("d"))
    assert kv.compact(4) == []  # no room left below 4 for the cached block: dropped
    assert kv.match_prefix(RequestId("e"), q) == 0


def test_compaction_reuses_a_cached_block_below_the_limit_when_none_is_free():
    kv = KVCacheManager(BlockPool(4), block_size=2)
    q = [7, 8, 9]
    _compute(kv, RequestId("c"), q)  # 0, 1
    kv.allocate(RequestId("h"), 4)  # 2, 3
    kv.free(RequestId("c"))  # 0 cached, 1 free
    kv.pool.allocate(1)  # takes 1: below 2 only the cached block 0 is left
    kv.free(RequestId("h"))
    kv.allocate(RequestId("h2"), 2)  # lowest free: 2
    assert kv.block_table(RequestId("h2")) == [2]
    assert kv.compact(2) == [(2, 0)]
    assert kv.match_prefix(RequestId("x"), q) == 0


def test_random_operations_keep_the_books_consistent():
    """Reference counts equal the tables holding each block; free + held = all; names point
    at held or cached blocks; no table reaches past the pool."""
    import random

    rng = random.Random(5)
    kv = KVCacheManager(BlockPool(24), block_size=2)
    prompts = [[i] * 3 + list(range(rng.randint(2, 9))) for i in range(4)]
    live: dict[RequestId, list[int]] = {}
    for step in range(3000):
        op = rng.random()
        if op < 0.4 and len(live) < 8:
            rid = RequestId(f"r{step}")
            p = rng.choice(prompts) + [rng.randint(0, 3) for _ in range(rng.randint(0, 4))]
            got = kv.match_prefix(rid, p)
            assert got % 2 == 0 and got < len(p) and p[:got] == p[:got]
            if not kv.can_allocate(rid, len(p)):
                kv.free(rid)
                continue
            kv.allocate(rid, len(p))
            kv.commit(rid, _tokens(p), len(p))
            live[rid] = p
        elif op < 0.7 and live:
            rid = rng.choice(sorted(live))
            kv.free(rid)
            del live[rid]
        elif op < 0.8:
            n = rng.randint(kv.pool.num_used, 30)
            if n < kv.pool.num_blocks:
                kv.compact(n)
            else:
                kv.pool.resize(n)
        pool = kv.pool
        holders: dict[int, int] = {}
        for rid in live:
            for blk in kv.block_table(rid):
                holders[blk] = holders.get(blk, 0) + 1
                assert blk < pool.num_blocks
        assert holders == pool._refs
        assert pool.shared_extra == sum(n - 1 for n in holders.values())
        assert pool.num_used + pool.num_free == pool.num_blocks
        assert set(pool._free).isdisjoint(pool._refs) and set(pool._cached).isdisjoint(pool._refs)
        assert set(pool._cached) <= set(pool._name) and set(pool._name) <= set(pool._refs) | set(pool._cached)
        assert {b: n for n, b in pool._by_name.items()} == pool._name


def test_a_freed_request_s_tail_is_evicted_before_the_prefix_it_extends():
    kv = KVCacheManager(BlockPool(3), block_size=2)
    p = [1, 2, 3, 4, 5, 6, 7]
    _compute(kv, RequestId("a"), p[:6])  # 0, 1, 2: all full
    kv.free(RequestId("a"))
    assert kv.pool.allocate(1) == [2]  # the last block goes first
    assert kv.match_prefix(RequestId("b"), p) == 4  # blocks 0 and 1 still chain
