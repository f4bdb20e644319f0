import pytest

from runtime.core.memory import (
    ActionKind,
    ActionState,
    DeviceActions,
    MemoryConfig,
    context_bound,
    instance_reservation_blocks,
    request_reservation_blocks,
    reservation_blocks,
    resize_target,
)

CFG = MemoryConfig(block_tokens=32, lookahead_tokens=512, watermark=1.25)


def test_request_reservation_includes_lookahead():
    assert request_reservation_blocks(CFG, 100, 0) == 20  # ceil(612 / 32)
    assert request_reservation_blocks(CFG, 100, 30) == 21  # ceil(642 / 32)
    assert instance_reservation_blocks(CFG, [(100, 0), (0, 0)]) == 20 + 16


def test_a_declared_max_tokens_caps_the_look_ahead():
    # 100-token prompt, 20 tokens of output at most: it can never hold more than 120 tokens.
    assert context_bound(100, 20, 4096) == 120
    assert reservation_blocks(100, 512, 32, context_bound(100, 20, 4096)) == 4  # ceil(120 / 32), not 20
    assert reservation_blocks(110, 512, 32, context_bound(100, 20, 4096)) == 4  # still within the bound
    assert context_bound(100, None, 4096) == 4096  # unbounded output: only the context limits it
    assert context_bound(4000, 500, 4096) == 4096  # nor past the context


@pytest.mark.parametrize(
    "current,reserved,expected",
    [
        (0, 16, 20),  # grow to reservation x 1.25
        (20, 16, None),  # fits: stay
        (20, 21, 27),  # outgrew: grow with headroom
        (40, 20, 25),  # target 25 < 40 / 1.25 = 32: shrink
        (30, 20, None),  # target 25 >= 30 / 1.25 = 24: hysteresis keeps it
        (100, 20, 25),  # far too big: shrink to target
        (10, 0, 0),  # no requests: release everything
    ],
)
def test_resize_target_with_hysteresis(current, reserved, expected):
    assert resize_target(CFG, current, reserved) == expected


def test_grow_is_never_committed_against_a_shrink_in_flight():
    dev = DeviceActions(budget=100)
    dev.adopt(90)  # instance A holds 90 blocks
    shrink = dev.submit(ActionKind.SHRINK, "A", 50)
    grow = dev.submit(ActionKind.GROW, "B", 40)
    assert shrink.state is ActionState.IN_FLIGHT
    assert dev.ready() == []  # only 10 free: the shrink has not freed anything yet
    assert grow.state is ActionState.QUEUED
    dev.complete(shrink.action_id)
    assert dev.free == 60
    assert dev.ready() == [grow]
    assert dev.free == 20 and grow.state is ActionState.IN_FLIGHT
    dev.complete(grow.action_id)
    assert dev.committed == 80


def test_claims_are_fifo_and_never_exceed_the_budget():
    dev = DeviceActions(budget=10)
    big = dev.submit(ActionKind.LOAD, "A", 8)
    small = dev.submit(ActionKind.GROW, "B", 3)
    assert dev.ready() == [big]
    assert dev.ready() == []  # small would fit in 2? no: 3 > 2 free
    assert dev.committed <= dev.budget
    unload = dev.submit(ActionKind.UNLOAD, "A", 8)
    dev.complete(big.action_id)
    assert dev.ready() == []  # unload still in flight
    dev.complete(unload.action_id)
    assert dev.ready() == [small]
    with pytest.raises(ValueError, match="exceeds the device budget"):
        dev.submit(ActionKind.LOAD, "C", 11)


def test_completing_twice_is_an_error():
    dev = DeviceActions(10)
    a = dev.submit(ActionKind.LOAD, "A", 1)
    dev.ready()
    dev.complete(a.action_id)
    with pytest.raises(KeyError):
        dev.complete(a.action_id)


@pytest.mark.parametrize("holdings, target, free_bytes, want", [
    # nothing held, 10 blocks of 100 bytes free
    ([(0, 0)], 0, 1000, 10),
    # another instance admitted 3 blocks it does not hold yet: they are spoken for
    ([(0, 0), (2, 5)], 0, 1000, 7),
    # the target holds 4 blocks beyond its reservations: its own slack counts
    ([(6, 2), (2, 5)], 0, 1000, 11),
    # promised more than is free: only the slack is left
    ([(6, 2), (0, 20)], 0, 1000, 4),
    # another instance lends 5 cached blocks: the device takes them back on demand
    ([(0, 0), (5, 0, 5)], 0, 1000, 15),
    # the target's own lent blocks are its slack already: not counted twice
    ([(5, 0, 5), (0, 0)], 0, 1000, 15),
])
def test_admissible_blocks_discount_unbacked_reservations(holdings, target, free_bytes, want):
    from runtime.core.memory import KVHolding, admissible_blocks

    hs = [KVHolding(*h[:2], 100, *h[2:]) for h in holdings]
    assert admissible_blocks(free_bytes, hs, hs[target]) == want
