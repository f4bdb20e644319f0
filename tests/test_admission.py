import math
import random

import pytest

from runtime.core import admission
from runtime.core.admission import (
    InstanceLoad,
    NewRequest,
    PendingDecode,
    PendingPrefill,
    RefusalReason,
    admit,
    device_demand,
    replay,
)
from runtime.core.estimator import LatencyEstimator, LatencyProfile

# prefill: 100 ms per 100 tokens (linear); decode: 50 ms at batch 1, 100 ms at batch 8, flat in context
PROFILE = LatencyProfile.from_tables(prefill=[[100, 100], [1000, 1000]],
                                     decode=[(100, [[1, 50], [8, 100]]), (10_000, [[1, 50], [8, 100]])])


def inst(iid, batch=0, ctx=100.0, tpot=0.25, prefills=(), max_ctx=2048, due=None):
    return InstanceLoad(iid, LatencyEstimator(PROFILE), tpot, batch, ctx, tuple(prefills), max_ctx, due)


def req(prompt=100, deadline=10.0, blocks=1):
    return NewRequest(prompt, deadline, blocks)


def test_admits_on_an_idle_device():
    d = admit([inst("a")], "a", req(), free_blocks=10, now=0.0)
    assert d.admitted and d.reason is None


def test_refuses_on_compute_when_decode_demand_exceeds_the_device():
    # b at batch 8 needs 100 ms per 250 ms = 0.4; a at batch 7 -> 8 needs 0.4 at TPOT 0.25 ... push with tight TPOT
    insts = [inst("a", batch=7, tpot=0.15), inst("b", batch=8, tpot=0.25)]
    assert device_demand(insts, "a", 100) == pytest.approx(100 / 150 + 100 / 250)
    d = admit(insts, "a", req(), free_blocks=100, now=0.0)
    assert not d.admitted and d.reason is RefusalReason.COMPUTE and d.retry_after_s > 0
    # without b the same request fits
    assert admit([inst("a", batch=7, tpot=0.15)], "a", req(), 100, 0.0).admitted


def test_refuses_on_prefill_when_an_existing_deadline_would_be_missed():
    # a pending 500-token prefill (0.5 s) due at 0.6 s; a newcomer of 300 tokens due at 0.35 s runs
    # first under EDF (0.3 s) and pushes the old one to 0.8 s > 0.6 s; then the newcomer's first
    # decode (due 0.35 + 0.25 = 0.6, ties go to decode, 50 ms) comes before it: 0.85 s.
    insts = [inst("a", prefills=[PendingPrefill(500, 0.6)]), inst("b")]
    d = admit(insts, "b", req(prompt=300, deadline=0.35), free_blocks=100, now=0.0)
    assert not d.admitted and d.reason is RefusalReason.PREFILL
    assert d.retry_after_s == pytest.approx(0.25)
    # with a later deadline the newcomer goes after and both fit? 0.5 + 0.3 = 0.8 <= 1.0
    assert admit(insts, "b", req(prompt=300, deadline=1.0), 100, 0.0).admitted


def test_newcomer_missing_its_own_deadline_is_refused_unless_the_device_is_idle():
    busy = [inst("a"), inst("b", batch=1, due=5.0)]
    d = admit(busy, "a", req(prompt=1000, deadline=0.5), free_blocks=100, now=0.0)
    assert d.reason is RefusalReason.PREFILL and "new" in d.detail
    # idle: nothing to protect, it is served as soon as it can be (and its steps correct the estimator)
    assert admit([inst("a"), inst("b")], "a", req(prompt=1000, deadline=0.5), 100, 0.0).admitted
    # but never past memory or context, idle or not
    assert admit([inst("a")], "a", req(prompt=1000, deadline=0.5, blocks=101), 100, 0.0).reason is RefusalReason.MEMORY


def test_cached_prompt_tokens_cost_no_prefill():
    # 1000 tokens take 1 s of prefill against a 0.5 s deadline; with 960 of them cached (prefix
    # caching) only 40 are computed, 40 ms: the same request fits, on a busy device as well
    busy = [inst("a"), inst("b", batch=1, due=5.0)]
    assert admit(busy, "a", req(prompt=1000, deadline=0.5), 100, 0.0).reason is RefusalReason.PREFILL
    cached = NewRequest(1000, 0.5, 1, cached_tokens=960)
    assert cached.prefill_tokens == 40
    assert admit(busy, "a", cached, 100, 0.0).admitted
    # the context limit still counts every token
    assert admit([inst("a", max_ctx=1000)], "a", cached, 100, 0.0).reason is RefusalReason.CONTEXT


def test_a_newcomer_late_even_alone_is_refused_on_prefill_not_compute():
    # The device is over on compute too, but no eviction could make a 1000-token prompt (1 s of
    # prefill) meet a 0.5 s deadline: the reason must not invite a preemption.
    insts = [inst("a", batch=7, tpot=0.15), inst("b", batch=8, tpot=0.25)]
    d = admit(insts, "a", req(prompt=1000, deadline=0.5), free_blocks=100, now=0.0)
    assert not d.admitted and d.reason is RefusalReason.PREFILL
    assert d.retry_after_s == pytest.approx(0.5)
    # one that could make it alone still gets the compute refusal
    assert admit(insts, "a", req(prompt=100, deadline=0.5), 100, 0.0).reason is RefusalReason.COMPUTE


def test_decode_load_slows_the_prefill_replay():
    # 400-token prefill = 0.4 s alone; with decode taking 0.4 of the device it takes 0.667 s.
    busy = [inst("a", batch=8, tpot=0.25), inst("b")]
    assert admit([inst("b")], "b", req(prompt=400, deadline=0.5), 100, 0.0).admitted
    assert admit(busy, "b", req(prompt=400, deadline=0.5), 100, 0.0).reason is RefusalReason.PREFILL


def test_prefills_are_replayed_in_the_instance_s_chunks():
    # 40 ms per step plus 1 ms per token: a 512-token prompt takes 0.552 s in one chunk, but
    # 8 x 0.104 = 0.832 s in the 64-token chunks its instance's step cap allows. Admission must
    # count the chunks the device will really run, or it admits a request that cannot make it.
    overhead = LatencyProfile.from_tables(prefill=[[16, 56], [512, 552]],
                                         decode=[(100, [[1, 50], [8, 50]]), (10_000, [[1, 50], [8, 50]])])

    def device(chunk):
        a = InstanceLoad("a", LatencyEstimator(overhead), 0.25, 0, 0.0, prefill_chunk_tokens=chunk)
        b = InstanceLoad("b", LatencyEstimator(overhead), 0.25, 1, 100.0, decode_deadline_s=5.0)
        return [a, b]  # b decodes, so the device is not idle

    assert admit(device(512), "a", req(prompt=512, deadline=0.7), 100, 0.0).admitted
    d = admit(device(64), "a", req(prompt=512, deadline=0.7), 100, 0.0)
    assert d.reason is RefusalReason.PREFILL and "alone" in d.detail
    late = replay(device(64), ("a", PendingPrefill(512, 0.0, 0)), 0.0).late["new"]
    assert late == pytest.approx(8 * 0.104, abs=1e-3)
    with pytest.raises(ValueError, match="prefill_chunk_tokens"):
        InstanceLoad("a", LatencyEstimator(overhead), 0.25, 0, 0.0, prefill_chunk_tokens=0)


def test_refuses_on_memory_and_context():
    assert admit([inst("a")], "a", req(blocks=11), free_blocks=10, now=0.0).reason is RefusalReason.MEMORY
    d = admit([inst("a", max_ctx=100)], "a", req(prompt=100), free_blocks=10, now=0.0)
    assert d.reason is RefusalReason.CONTEXT and "100" in d.detail


def test_overdue_prefill_does_not_block_everyone():
    # an existing prefill already late (deadline in the past) is late either way: not the newcomer's fault
    insts = [inst("a", prefills=[PendingPrefill(100, -1.0)])]
    assert admit(insts, "a", req(prompt=100, deadline=5.0), 100, 0.0).admitted


def test_decodes_ahead_of_schedule_yield_the_device_to_a_prefill():
    # a at batch 8 needs 0.4 of the device. If its next token is due only in 2 s (it ran ahead),
    # EDF gives the whole device to b's 400-token prefill (0.4 s <= 0.5 s): admitted. A replay
    # that gave prefills only the 0.6 share decode leaves (0.667 s) would refuse it.
    ahead = [inst("a", batch=8, due=2.0), inst("b")]
    assert admit(ahead, "b", req(prompt=400, deadline=0.5), 100, 0.0).admitted
    # the same load due now: two decode iterations come first (0.2 s), the prefill ends at 0.6 s
    due_now = [inst("a", batch=8, due=0.0), inst("b")]
    assert admit(due_now, "b", req(prompt=400, deadline=0.5), 100, 0.0).reason is RefusalReason.PREFILL


def test_refuses_a_prefill_that_would_make_a_running_stream_late():
    # a's next token is due at 0.27 (50 ms of work). b's 250-token prefill is due at 0.26, so EDF
    # runs it first (0.25 s) and it meets its own deadline, but a's token then lands at 0.30.
    insts = [inst("a", batch=1, due=0.27), inst("b")]
    d = admit(insts, "b", req(prompt=250, deadline=0.26), 100, 0.0)
    assert not d.admitted and d.reason is RefusalReason.PREFILL and "d:a" in d.detail
    assert d.retry_after_s == pytest.approx(0.1)  # 30 ms late; hints are at least 0.1 s
    # with a's token due later there is room for both
    assert admit([inst("a", batch=1, due=0.35), inst("b")], "b", req(prompt=250, deadline=0.26), 100, 0.0).admitted


def test_already_late_stream_is_not_held_against_the_newcomer():
    # a is behind (due at -1 s): it is late whatever happens; b's prefill due after it adds nothing.
    insts = [inst("a", batch=1, due=-1.0), inst("b")]
    assert admit(insts, "b", req(prompt=100, deadline=1.0), 100, 0.0).admitted


def bounded_inst(iid, n, tokens_left, due, tpot):
    decodes = tuple(PendingDecode(tokens_left, due) for _ in range(n))
    return InstanceLoad(iid, LatencyEstimator(PROFILE), tpot, n, 100.0, (), 2048, due, decodes)


def test_short_bounded_outputs_free_the_device_for_a_newcomer():
    # The same load as the compute test (demand 1.07 with the newcomer), but every running request
    # has 2 tokens left: the replay sees them finish and the newcomer (5 tokens) fits behind them.
    short = [bounded_inst("a", 7, 2, 0.15, 0.15), bounded_inst("b", 8, 2, 0.25, 0.25)]
    assert admit(short, "a", NewRequest(100, 10.0, 1, output_tokens=5), 100, 0.0).admitted
    # an unbounded newcomer could run forever at demand 1.07: the steady-state rule refuses it
    assert admit(short, "a", NewRequest(100, 10.0, 1), 100, 0.0).reason is RefusalReason.COMPUTE
    # long outputs still running when the replay ends are held to the steady-state rule
    long = [bounded_inst("a", 7, 1000, 0.15, 0.15), bounded_inst("b", 8, 1000, 0.25, 0.25)]
    d = admit(long, "a", NewRequest(100, 10.0, 1, output_tokens=1000), 100, 0.0)
    assert d.reason is RefusalReason.COMPUTE and "1.07" in d.detail


def test_bounded_stream_may_slip_a_token_if_its_last_one_is_on_time():
    # As above, b's prefill delays a's next token by 30 ms; but a has 10 tokens left and its last
    # is due at 0.27 + 9 x 0.25 s: the mean TPOT (the SLO) holds, so b is admitted.
    insts = [bounded_inst("a", 1, 10, 0.27, 0.25), inst("b")]
    assert admit(insts, "b", NewRequest(250, 0.26, 1, output_tokens=1), 100, 0.0).admitted
    # with one token left, that token is the last one: late, refused
    insts = [bounded_inst("a", 1, 1, 0.27, 0.25), inst("b")]
    d = admit(insts, "b", NewRequest(250, 0.26, 1, output_tokens=1), 100, 0.0)
    assert d.reason is RefusalReason.PREFILL and "d:a" in d.detail


def _random_device(rng, unbounded):
    """A few instances with decoding streams (some late, some ahead) and pending prefills."""
    insts = []
    for n in range(rng.randint(1, 4)):
        tpot = rng.choice([0.1, 0.25])
        decodes = tuple(PendingDecode(math.inf if unbounded and rng.random() < 0.5 else rng.randint(1, 80),
                                      rng.uniform(-0.1, 2.0)) for _ in range(rng.randint(0, 6)))
        prefills = tuple(PendingPrefill(rng.randint(1, 1200), rng.uniform(0.2, 4.0),
                                        math.inf if unbounded and rng.random() < 0.3 else rng.randint(0, 60))
                         for _ in range(rng.randint(0, 3)))
        insts.append(InstanceLoad(f"i{n}", LatencyEstimator(PROFILE), tpot, len(decodes),
                                  rng.uniform(50, 3000), prefills, decodes=decodes))
    return insts


@pytest.mark.parametrize("unbounded", [False, True])
def test_replay_runs_ahead_exactly_as_it_steps(monkeypatch, unbounded):
    # The replay skips the bookkeeping of iterations that change nothing but the clock; with that
    # shortcut off it steps every iteration. Both must give the same lateness and leftover demand.
    rng = random.Random(7 + unbounded)
    cases = [(_random_device(rng, unbounded), rng.uniform(0.3, 3.0), rng.randint(1, 900)) for _ in range(300)]
    ran_ahead = []
    real = admission._Stream.run_ahead

    def counted(self, t, limit, late):
        t, steps = real(self, t, limit, late)
        ran_ahead.append(steps)
        return t, steps

    monkeypatch.setattr(admission._Stream, "run_ahead", counted)
    fast = [replay(insts, (insts[0].instance_id, PendingPrefill(p, d, 40)), 0.0) for insts, d, p in cases]
    assert sum(ran_ahead) > 10 * len(cases)  # the shortcut did most of the stepping
    monkeypatch.setattr(admission._Stream, "run_ahead", lambda self, t, limit, late: (t, 0))
    slow = [replay(insts, (insts[0].instance_id, PendingPrefill(p, d, 40)), 0.0) for insts, d, p in cases]
    assert fast == slow
    assert sum(bool(r.late) for r in slow) > 20 and sum(not r.late for r in slow) > 20  # both kinds covered


# -- displacement: a longer pending prompt may give way to a shorter newcomer -----------------
# a: one pending 500-token prompt (0.5 s) due at 0.6 s, no token out yet. A 200-token newcomer
# (0.2 s) due at 0.3 s runs first under EDF and pushes it to 0.7 s: refused on its own account.
LONG = PendingPrefill(500, 0.6, 10, key="long", displaceable=True)
SHORT = NewRequest(200, 0.3, 1, output_tokens=10)


def test_a_longer_pending_prompt_gives_way_to_a_shorter_newcomer():
    insts = [inst("a", prefills=[LONG]), inst("b")]
    plain = admit(insts, "b", SHORT, free_blocks=100, now=0.0)
    assert not plain.admitted and plain.reason is RefusalReason.PREFILL and "long" in plain.detail
    d = admit(insts, "b", SHORT, free_blocks=100, now=0.0, displace=True)
    assert d.admitted and d.displace == ("a", "long")
    # What it was admitted against: the device without the long prompt keeps every deadline.
    rest = [inst("a"), inst("b")]
    assert admit(rest, "b", SHORT, 100, 0.0).admitted


@pytest.mark.parametrize("why, prefills", [
    ("it has a token out already", [PendingPrefill(500, 0.6, 10, key="long", displaceable=False)]),
    ("it is not 1.5 x longer: 0.25 s against 0.2 s", [PendingPrefill(250, 0.35, 10, key="long", displaceable=True)]),
    ("lateness is compared job by job: every job needs a name",
     [PendingPrefill(500, 0.6, 10, displaceable=True), PendingPrefill(1, 9.0, 1)]),
])
def test_no_displacement_when(why, prefills):
    d = admit([inst("a", prefills=prefills), inst("b")], "b", SHORT, 100, 0.0, displace=True)
    assert not d.admitted and d.reason is RefusalReason.PREFILL and d.displace is None, why


def test_no_displacement_when_another_job_would_still_be_late():
    # A second pending prompt (150 tokens due at 0.34 s) would end at 0.35 s behind the newcomer
    # even with the long one gone: handing that one back would not save it.
    other = PendingPrefill(150, 0.34, 10, key="other", displaceable=False)
    d = admit([inst("a", prefills=[LONG, other]), inst("b")], "b", SHORT, 100, 0.0, displace=True)
    assert not d.admitted and d.displace is None


def test_a_newcomer_is_judged_against_its_slo_and_the_incumbents_against_their_margin():
    # a's pending 200-token prompt (0.2 s) is due first, at 0.25 s; the newcomer's 300 tokens (0.3 s)
    # then end at 0.5 s, 0.05 s past its planning deadline of 0.45 s. Its own slack (the room
    # between that deadline and its SLO) decides, and nothing else's lateness is excused by it.
    insts = [inst("a", prefills=[PendingPrefill(200, 0.25, output_tokens=0, key="r1")]), inst("b")]

    def new(deadline, slack):
        return NewRequest(300, deadline, 1, output_tokens=0, own_slack_s=slack)

    refused = admit(insts, "b", new(0.45, 0.04), 100, 0.0)
    assert refused.reason is RefusalReason.PREFILL and "(new)" in refused.detail
    assert admit(insts, "b", new(0.45, 0.06), 100, 0.0).admitted
    # Due before a's prompt, the newcomer would run first and make r1 late: refused however much
    # slack of its own it has.
    hurt = admit(insts, "b", new(0.2, 1.0), 100, 0.0)
    assert not hurt.admitted and "r1" in hurt.detail
    # The "alone from now" check counts the slack too: 0.3 s of prefill against 0.27 + 0.05.
    assert admit(insts, "b", new(0.27, 0.05), 100, 0.0).reason is not None
    assert "alone" not in admit(insts, "b", new(0.27, 0.05), 100, 0.0).detail
    assert "alone" in admit(insts, "b", new(0.27, 0.02), 100, 0.0).detail
