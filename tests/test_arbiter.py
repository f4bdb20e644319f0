import math

import pytest

from runtime.core.arbiter import (
    MIN_PREFILL_CHUNK,
    Candidate,
    DeviceKind,
    Grant,
    Phase,
    next_token_deadline,
    pick,
    prefill_chunk_budget,
)


def test_deadline_formula():
    # arrival 10, load 0.3, TTFT 0.5, TPOT 0.25 x 4 emitted tokens
    assert next_token_deadline(10.0, 0.5, 0.25, 4, load_delay_s=0.3) == pytest.approx(11.8)


@pytest.mark.parametrize(("first_token_s", "emitted", "want"), [
    (None, 3, 11.25),  # no first token known: by arrival
    (10.2, 0, 10.5),  # the first token itself is due by arrival + TTFT
    (10.2, 1, 10.45),  # after it, TPOT counts from when it came (early here) ...
    (10.2, 3, 10.95),
    (11.0, 3, 11.75),  # ... or late (its TTFT missed, its TPOT still kept)
])
def test_deadline_after_the_first_token(first_token_s, emitted, want):
    assert next_token_deadline(10.0, 0.5, 0.25, emitted, first_token_s=first_token_s) == pytest.approx(want)


def test_earliest_deadline_runs_first():
    cands = [Candidate("a", 5.0, Phase.DECODE), Candidate("b", 3.0, Phase.DECODE), Candidate("c", 4.0, Phase.PREFILL)]
    assert pick(cands, DeviceKind.CPU) == Grant("b", 1, 3.0)


def test_a_tight_tpot_instance_overtakes_a_loose_one_as_tokens_are_emitted():
    # a: tight TPOT (0.1 s), b: loose TPOT (1 s); both arrived at 0 with TTFT 0.5.
    order = []
    emitted = {"a": 0, "b": 0}
    tpot = {"a": 0.1, "b": 1.0}
    for _ in range(8):
        cands = [Candidate(i, next_token_deadline(0.0, 0.5, tpot[i], emitted[i]), Phase.DECODE) for i in "ab"]
        g = pick(cands, DeviceKind.CPU)
        assert g is not None
        order.append(g.instance_id)
        emitted[g.instance_id] += 1
    # Both first tokens are due at 0.5: a wins the tie on id; b's first (0.5) then precedes a's
    # second (0.6); after that a's deadlines (0.6, 0.7, ...) all precede b's second (1.5).
    assert order == ["a", "b", "a", "a", "a", "a", "a", "a"]


def test_ties_break_by_instance_id_and_idle_device_gets_nothing():
    assert pick([Candidate("z", 1.0, Phase.DECODE), Candidate("m", 1.0, Phase.DECODE)], DeviceKind.CPU).instance_id == "m"
    assert pick([], DeviceKind.GPU) is None


@pytest.mark.parametrize(
    "device,phase,quota,expected",
    [(DeviceKind.GPU, Phase.DECODE, 4, 4), (DeviceKind.GPU, Phase.PREFILL, 4, 1), (DeviceKind.CPU, Phase.DECODE, 4, 1)],
)
def test_quota(device, phase, quota, expected):
    assert pick([Candidate("a", 1.0, phase, decode_quota=quota)], device).iterations == expected


def test_prefill_chunk_budget_fits_the_decode_slack():
    ms_per_token = lambda n: n * 0.001  # noqa: E731  (1 ms per prompt token)
    assert prefill_chunk_budget(ms_per_token, math.inf, 512) is None  # nothing decodes: no cap
    assert prefill_chunk_budget(ms_per_token, 0.1, 512) == 100  # the largest chunk ending in time
    assert prefill_chunk_budget(ms_per_token, 1.0, 512) == 512  # all of it fits
    assert prefill_chunk_budget(ms_per_token, -0.2, 512) == MIN_PREFILL_CHUNK  # late already: progress anyway
    assert prefill_chunk_budget(ms_per_token, 0.0, 16) == 16  # the floor never exceeds the step budget
