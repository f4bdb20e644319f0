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
