"""Several real (tiny random) model instances on one device loop, arbitrated by EDF."""

from __future__ import annotations

import math

import pytest

from functions import SLO, FunctionSpec
from runtime.core.admission import RefusalReason
from runtime.core.arbiter import SLO_MARGIN, DeviceKind
from runtime.core.estimator import LatencyEstimator, LatencyProfile
from runtime.core.ids import RequestId
from runtime.core.request import SamplingParams
from runtime.device import Anchor, DeviceLoop, Instance
from runtime.engine.engine import EngineConfig, LLMEngine
from runtime.engine.profiler import profile_engine
from runtime.models.loader import load_model

GREEDY_4 = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
FLAT = LatencyProfile.from_tables([[1, 1], [1000, 100]], [(1, [[1, 5], [64, 50]])])


@pytest.fixture(scope="module")
def tiny():
    return load_model("random:llama-tiny?seed=0")


def make_instance(loaded, iid, tpot_s=0.25, ttft_base_s=0.5, profile=FLAT, **cfg):
    spec = FunctionSpec(name=iid, model=loaded.ref, slo=SLO(ttft_base_s=ttft_base_s, tpot_s=tpot_s))
    eng = LLMEngine(loaded, EngineConfig(block_size=16, **cfg))
    return Instance(iid, spec, eng, LatencyEstimator(profile))


def test_edf_order_between_instances_with_different_deadlines(tiny):
    dev = DeviceLoop(DeviceKind.CPU, clock=lambda: 0.0)  # every token "at once": deadlines alone decide
    dev.add_instance(make_instance(tiny, "a", tpot_s=0.05))
    dev.add_instance(make_instance(tiny, "b", tpot_s=1.0))
    sp = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    for iid in "ab":
        dev.instances[iid].engine.add_request(RequestId(iid + "1"), [5, 6, 7, 8], sp, now=0.0)
    grants = []
    for _ in range(24):
        g, _ = dev.step()
        assert g is not None
        grants.append(g.instance_id)
    # First tokens both due at 0.5: a wins the tie by id. Its first token came at 0, so its next
    # ones are due at 0.05, 0.10, ..., 0.5 (tie -> a) before b's first; b's (at 0) then makes its
    # second due at 1.0, after a's 0.55 .. 1.0 (tie -> a).
    assert grants[:23] == ["a"] * 11 + ["b"] + ["a"] * 10 + ["b"]
    assert dev.stats.decisions == 24 and dev.stats.mean_us > 0


def test_deadlines_after_the_first_token_count_from_when_it_came(tiny):
    # a's first token is due at 0.4 and comes at 0.1. The TPOT SLO times a's later tokens from
    # 0.1, so its second is due at 0.35, before b's first (0.5). By arrival (the paper's formula)
    # it would be due at 0.65: b would go first, and a's stream would drift past its TPOT.
    dev = DeviceLoop(DeviceKind.CPU, clock=lambda: 0.1)
    dev.add_instance(make_instance(tiny, "a", ttft_base_s=0.4))
    dev.add_instance(make_instance(tiny, "b", ttft_base_s=0.5))
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    for iid in "ab":
        dev.instances[iid].engine.add_request(RequestId(iid), [5, 6, 7], sp, now=0.0)
    assert dev.step()[0].instance_id == "a"  # its prefill: first token at 0.1
    assert dev.instances["a"].engine.scheduler.get(RequestId("a")).first_token_s == 0.1
    keep = 1 - SLO_MARGIN  # the device plans against SLOs 5% tighter
    assert {c.instance_id: c.deadline_s for c in dev.candidates()} == pytest.approx({"a": 0.1 + 0.25 * keep,
                                                                                     "b": 0.5 * keep})
    assert [dev.step()[0].instance_id for _ in range(3)] == ["a", "b", "b"]  # a's third: 0.1 + 0.5 * keep


def test_idle_instances_are_not_candidates(tiny):
    dev = DeviceLoop()
    dev.add_instance(make_instance(tiny, "busy"))
    dev.add_instance(make_instance(tiny, "idle"))
    dev.instances["busy"].engine.add_request(RequestId("r"), [5, 6], SamplingParams(max_tokens=3, temperature=0), 0.0)
    assert [c.instance_id for c in dev.candidates()] == ["busy"]
    while dev.has_work:
        dev.step()
    assert dev.step() == (None, [])
    assert "idle" not in dev.stats.grants


def test_admission_through_the_device(tiny):
    # decode at batch 1 takes 0.3 s by this profile; TPOT is 0.25 s -> no room to decode at all
    slow = LatencyProfile.from_tables([[1, 1], [1000, 100]], [(1, [[1, 300], [64, 400]])])
    dev = DeviceLoop()
    dev.add_instance(make_instance(tiny, "a", profile=slow))
    assert dev.admit("a", 10, now=0.0).admitted  # idle: nothing to protect
    dev.instances["a"].engine.add_request(RequestId("r"), [5, 6], SamplingParams(max_tokens=3, temperature=0), 0.0)
    d = dev.admit("a", 10, now=0.0)  # may decode to the end of its context: never at this TPOT
    assert not d.admitted and d.reason is RefusalReason.COMPUTE
    dev2 = DeviceLoop()
    dev2.add_instance(make_instance(tiny, "a", max_model_len=64))
    assert dev2.admit("a", 64, now=0.0).reason is RefusalReason.CONTEXT
    assert dev2.admit("a", 20, now=0.0).admitted


@pytest.mark.parametrize("slack", [True, False])
def test_the_device_plans_a_newcomer_against_its_slo_and_times_admission(tiny, monkeypatch, slack):
    import runtime.device as device_mod

    seen = []
    real = device_mod.admit

    def spy(loads, iid, req, free, now, displace=False):
        seen.append(req)
        return real(loads, iid, req, free, now, displace=displace)

    monkeypatch.setattr(device_mod, "admit", spy)
    dev = DeviceLoop(newcomer_slack=slack)
    dev.add_instance(make_instance(tiny, "a", ttft_base_s=0.8))
    assert dev.admit("a", 10, now=0.0).admitted
    (req,) = seen
    assert req.ttft_deadline_s == pytest.approx(0.8 * (1 - SLO_MARGIN))
    assert req.own_slack_s == pytest.approx(0.8 * SLO_MARGIN if slack else 0.0)
    assert dev.stats.admissions == 1 and 0 < dev.stats.admit_max_s <= dev.stats.admit_total_s


def test_profile_measures_real_steps_and_leaves_no_kv(tiny):
    inst = make_instance(tiny, "p")
    prof = profile_engine(inst.engine, prefill_lengths=(16, 128), decode_points=((32, (1, 4)),), decode_steps=2)
    assert [n for n, _ in prof.prefill_ms] == [16, 128]
    assert all(ms > 0 for _, ms in prof.prefill_ms)
    assert [b for b, _ in prof.decode_ms[0][1]] == [1, 4]
    assert inst.engine.kv_blocks_used == 0 and not inst.engine.has_work
    # nothing it timed came from the prefix cache, and the cache is on again for requests
    assert inst.engine.scheduler.kv.hit_tokens == 0 and inst.engine.scheduler.kv.prefix_caching


def test_kv_never_exceeds_the_device_budget_under_adversarial_lengths(tiny):
    # Three instances, requests that never stop early (ignore_eos, long max_tokens): their KV
    # keeps growing past what admission could know. Budget: 40 blocks of 16 tokens in total.
    from runtime.core.memory import MemoryConfig
    from runtime.core.request import FinishReason

    probe = make_instance(tiny, "probe")
    bpb = probe.engine.bytes_per_block
    budget = 40 * bpb
    dev = DeviceLoop(DeviceKind.CPU, kv_budget_bytes=budget, memory=MemoryConfig(block_tokens=16, lookahead_tokens=32))
    for iid in ("a", "b", "c"):
        dev.add_instance(make_instance(tiny, iid, kv_cache_bytes=0, max_model_len=160))
    sp = SamplingParams(max_tokens=150, temperature=0, ignore_eos=True)
    rids = []
    for k in range(4):
        for iid in ("a", "b", "c"):
            rid = RequestId(f"{iid}{k}")
            rids.append(rid)
            dev.instances[iid].engine.add_request(rid, list(range(5, 5 + 20 + 7 * k)), sp, now=0.0)
    ended = {}
    steps = recomputes = 0
    while dev.has_work:
        g, outs = dev.step()
        if g is not None:
            plan = dev.instances[g.instance_id].engine.last_plan
            recomputes += len(plan.preempted) if plan else 0
        for o in outs:
            if o.finished:
                ended[o.rid] = o
        assert dev.kv_bytes <= budget
        for inst in dev.instances.values():
            assert inst.engine.kv_blocks_used <= inst.engine.kv_blocks_total
        steps += 1
        assert steps < 5000, steps
    assert dev.peak_kv_bytes <= budget
    assert dev.peak_kv_bytes > budget // 2  # the budget was actually used
    assert set(ended) == set(rids)  # nothing lost
    reasons = {o.finish_reason for o in ended.values()}
    evicted = sum(o.finish_reason is FinishReason.PREEMPTED for o in ended.values())
    assert recomputes + evicted > 0  # memory pressure really happened
    assert reasons <= {FinishReason.LENGTH, FinishReason.PREEMPTED}
    for o in ended.values():
        if o.finish_reason is FinishReason.PREEMPTED:
            assert o.continuation is not None and len(o.continuation.prompt_token_ids) > 0
    dev.plan_memory()  # what the device does on an idle tick
    # idle instances shrink to their cached prompt prefixes, all of it lent: taken back on demand
    assert dev.kv_bytes == sum(i.lent_blocks(0) for i in dev.instances.values()) * bpb > 0
    dev.reclaim(budget)
    assert dev.kv_bytes == 0 and dev.actions.free == budget


def test_oversized_request_is_evicted_with_a_continuation(tiny):
    from runtime.core.request import FinishReason

    bpb = LLMEngine(tiny, EngineConfig(block_size=16, kv_cache_bytes=0)).bytes_per_block
    eng = LLMEngine(tiny, EngineConfig(block_size=16, kv_cache_bytes=4 * bpb))
    assert eng.kv_blocks_total == 4  # 64 tokens
    eng.add_request(RequestId("big"), list(range(5, 45)), SamplingParams(max_tokens=100, temperature=0, ignore_eos=True), 0.0)
    outs = []
    while eng.has_work:
        outs.extend(eng.step())
    assert outs[-1].finish_reason is FinishReason.PREEMPTED
    cont = outs[-1].continuation
    assert cont is not None and len(cont.prompt_token_ids) + len(cont.output_token_ids) == 64
    assert eng.kv_blocks_used == 0


def test_unloading_an_instance_returns_its_memory_to_the_os():
    import gc

    from runtime.engine.engine import release_memory, rss_bytes

    gc.collect()
    release_memory()
    before = rss_bytes()
    loaded = load_model("random:smollm2-shape?seed=0")  # 538 MB of fp32 weights
    dev = DeviceLoop()
    dev.add_instance(make_instance(loaded, "big", kv_cache_bytes=0))
    dev.instances["big"].engine.add_request(RequestId("r"), [5, 6, 7], SamplingParams(max_tokens=2, temperature=0), 0.0)
    while dev.has_work:
        dev.step()
    loaded_rss = rss_bytes()
    assert loaded_rss - before > 400e6
    inst, _ = dev.remove_instance("big")
    del inst, loaded
    gc.collect()
    release_memory()
    after = rss_bytes()
    assert loaded_rss - after > 400e6, (before, loaded_rss, after)


def test_a_failing_instance_is_contained_and_its_requests_get_continuations(tiny, monkeypatch):
    from runtime.core.request import FinishReason

    dev = DeviceLoop()
    dev.add_instance(make_instance(tiny, "bad", ttft_base_s=0.1))  # earlier deadline: runs first
    dev.add_instance(make_instance(tiny, "good"))
    sp = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    dev.instances["bad"].engine.add_request(RequestId("b"), [5, 6, 7], sp, 0.0)
    dev.instances["good"].engine.add_request(RequestId("g"), [5, 6, 7], sp, 0.0)

    def boom(plan):
        raise RuntimeError("kernel failure")

    monkeypatch.setattr(dev.instances["bad"].engine.runner, "execute", boom)
    g, outs = dev.step()
    assert g is not None and g.instance_id == "bad"
    assert [(o.rid, o.finish_reason) for o in outs] == [("b", FinishReason.PREEMPTED)]
    assert outs[0].continuation is not None and dev.stats.failures == 1
    done = []
    while dev.has_work:
        done += [o for o in dev.step()[1] if o.finished]
    assert [(o.rid, o.finish_reason) for o in done] == [("g", FinishReason.LENGTH)]


def test_back_to_back_admissions_do_not_count_the_same_free_memory(tiny):
    from runtime.core.memory import MemoryConfig

    bpb = LLMEngine(tiny, EngineConfig(block_size=16, kv_cache_bytes=0)).bytes_per_block
    # 10 blocks in all; each request reserves ceil((20 + 64) / 16) = 6 blocks.
    dev = DeviceLoop(kv_budget_bytes=10 * bpb, memory=MemoryConfig(block_tokens=16, lookahead_tokens=64))
    dev.add_instance(make_instance(tiny, "a", kv_cache_bytes=0))
    assert dev.admit("a", 20, now=0.0).admitted
    long_output = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)  # the look-ahead binds
    dev.instances["a"].engine.add_request(RequestId("r1"), list(range(5, 25)), long_output, 0.0)
    second = dev.admit("a", 20, now=0.0)  # no plan_memory in between
    assert not second.admitted and second.reason is RefusalReason.MEMORY


def test_a_short_max_tokens_reserves_only_what_it_can_use(tiny):
    from runtime.core.memory import MemoryConfig

    bpb = LLMEngine(tiny, EngineConfig(block_size=16, kv_cache_bytes=0)).bytes_per_block
    # 5 blocks in all. Unbounded, a 20-token prompt reserves ceil((20 + 64) / 16) = 6 blocks and
    # cannot fit; with max_tokens 8 it can hold 28 tokens at most: 2 blocks, so two fit (4 blocks,
    # x 1.25 watermark = 5), and a third does not.
    dev = DeviceLoop(kv_budget_bytes=5 * bpb, memory=MemoryConfig(block_tokens=16, lookahead_tokens=64))
    dev.add_instance(make_instance(tiny, "a", kv_cache_bytes=0))
    refused = dev.admit("a", 20, now=0.0)
    assert not refused.admitted and refused.reason is RefusalReason.MEMORY
    short = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    for rid in ("r1", "r2"):
        assert dev.admit("a", 20, now=0.0, max_tokens=8).admitted
        dev.instances["a"].engine.add_request(RequestId(rid), list(range(5, 25)), short, 0.0)
        dev.plan_memory()
    assert dev.instances["a"].engine.reserved_blocks(64) == 4
    assert not dev.admit("a", 20, now=0.0, max_tokens=8).admitted  # the budget is spent
    done = []
    while dev.has_work:
        done += [o for o in dev.step()[1] if o.finished]
    assert sorted(o.rid for o in done) == ["r1", "r2"]
    assert all(o.completion_tokens == 8 for o in done)


def test_a_retried_request_keeps_its_arrival_deadline(tiny):
    dev = DeviceLoop()
    dev.add_instance(make_instance(tiny, "a", ttft_base_s=0.5))
    dev.add_instance(make_instance(tiny, "b", ttft_base_s=5.0))  # some work on the device: not idle
    dev.instances["b"].engine.add_request(RequestId("r"), [5, 6], SamplingParams(max_tokens=3, temperature=0), 0.0)
    assert dev.admit("a", 10, now=0.4, arrival_s=0.0).admitted  # 0.1 s left is plenty for 10 tokens
    late = dev.admit("a", 10, now=0.6, arrival_s=0.0)  # its TTFT deadline (0.5) has passed
    assert not late.admitted and late.reason is RefusalReason.PREFILL


def test_deadlines_keep_running_from_arrival_while_they_can_be_met(tiny):
    dev = DeviceLoop()
    dev.add_instance(make_instance(tiny, "a", ttft_base_s=0.5))
    keep = 1 - SLO_MARGIN
    assert dev.anchor("a", 10, now=10.0, received_s=10.0) == Anchor(10.0)  # nothing before the pod
    # Held 0.3 s by the activator: its first token stays due 0.5 s (planned: 0.475) after arrival.
    assert dev.anchor("a", 10, now=10.0, received_s=10.0, elapsed_s=0.3).arrival_s == pytest.approx(9.7)
    # Held 0.6 s: late even alone on the device, so served as if it had just arrived (best
    # effort) rather than refused everywhere or put ahead of work that can still be on time.
    assert dev.anchor("a", 10, now=10.0, received_s=10.0, elapsed_s=0.6) == Anchor(10.0)
    # A stream continued after 20 tokens, 1 s after it arrived: its 21st token is due on its
    # original schedule, arrival + TTFT(its own prompt) + 20 x TPOT (the paper's formula) ...
    a = dev.anchor("a", 30, now=10.0, received_s=10.0, elapsed_s=1.0, resumed=20)
    assert (a.arrival_s, a.resumed, a.first_token_s) == (pytest.approx(9.0), 20, None)
    assert dev.instances["a"].first_deadline(30, a.arrival_s, 20) == pytest.approx(9.0 + (0.5 + 20 * 0.25) * keep)
    # ... or, when the runtime that ran it said when its first token came (0.9 s ago), TPOT x 20
    # after that: the mean-TPOT rule every stream keeps to.
    a = dev.anchor("a", 30, now=10.0, received_s=10.0, elapsed_s=1.0, resumed=20, first_token_age_s=0.9)
    assert (a.arrival_s, a.resumed, a.first_token_s) == (pytest.approx(9.0), 20, pytest.approx(9.1))
    sp = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, resumed_tokens=20)
    dev.instances["a"].engine.add_request(RequestId("c"), list(range(5, 35)), sp, a.arrival_s, a.resumed,
                                          a.first_token_s)
    req = dev.instances["a"].engine.scheduler.get(RequestId("c"))
    due = 9.1 + 20 * 0.25 * keep
    assert dev.instances["a"].deadline(req) == pytest.approx(due)
    assert dev.instances["a"].first_deadline(30, a.arrival_s, 20, a.first_token_s) == pytest.approx(due)
    while req.num_computed_tokens < 30 or not req.output_token_ids:  # its first new token here
        dev.step()
    assert dev.instances["a"].deadline(req) == pytest.approx(9.1 + 21 * 0.25 * keep)  # still from 9.1
    # Continued 6 s after its first token: its 21st token was due at 4.75 s after it: late, so
    # it starts afresh.
    assert dev.anchor("a", 30, now=10.0, received_s=10.0, elapsed_s=6.5, resumed=20, first_token_age_s=6.0) == Anchor(10.0)


def test_a_request_held_before_the_pod_goes_before_one_that_just_arrived(tiny):
    dev = DeviceLoop(DeviceKind.CPU, clock=lambda: 10.0)
    for iid in "ab":
        dev.add_instance(make_instance(tiny, iid))
    for iid, elapsed in (("a", 0.0), ("b", 0.3)):  # same SLO, same prompt, b held 0.3 s before
        a = dev.anchor(iid, 4, now=10.0, received_s=10.0, elapsed_s=elapsed)
        dev.instances[iid].engine.add_request(RequestId(iid), [5, 6, 7, 8], GREEDY_4, a.arrival_s)
    assert dev.step()[0].instance_id == "b"  # restarted at the pod, the tie would go to a by id


def test_a_long_prompt_shares_steps_with_a_decode_in_chunks_that_keep_its_deadline(tiny):
    # a decodes (next token due 0.2375 s after its first, at 0.0); a 200-token prompt arrives for
    # the same instance at 0.2. At 1 ms per prompt token, the whole prompt in that step would end
    # at 0.4, past a's deadline; the step carries only what fits, and a's token comes with it.
    now = [0.0]
    dev = DeviceLoop(DeviceKind.CPU, clock=lambda: now[0])
    ms_per_token = LatencyProfile.from_tables([[1, 1], [1000, 1000]], [(1, [[1, 5], [64, 50]])])
    dev.add_instance(make_instance(tiny, "a", profile=ms_per_token, max_num_batched_tokens=256))
    eng = dev.instances["a"].engine
    eng.add_request(RequestId("short"), [5, 6, 7, 8], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True),
                    now=0.0)
    dev.step()  # its prefill: first token at 0.0
    dev.instances["a"].estimator = LatencyEstimator(ms_per_token)  # forget that step's observed time
    now[0] = 0.2
    eng.add_request(RequestId("long"), list(range(3, 203)), GREEDY_4, now=0.2)
    dev.step()
    chunk = {str(q.rid): len(q.token_ids) for q in eng.last_plan.seqs}
    slack_tokens = int((0.25 * (1 - SLO_MARGIN) - 0.2) * 1000)  # 37
    assert chunk == {"short": 1, "long": slack_tokens}
    now[0] = 0.5  # past the decode's next deadline (0.475): the floor keeps the prompt moving
    dev.step()
    assert {str(q.rid): len(q.token_ids) for q in eng.last_plan.seqs} == {"short": 1, "long": 32}


def test_a_long_prompt_alone_runs_in_steps_no_longer_than_the_step_cap(tiny):
    # No decode anywhere, so only the step cap bounds the chunk: at 1 ms per prompt token a 0.2 s
    # step carries 200 tokens, and a short prompt arriving meanwhile waits for one such step, not
    # for the whole 400-token prompt. Admission replays the same 200-token chunks.
    ms_per_token = LatencyProfile.from_tables([[1, 1], [1000, 1000]], [(1, [[1, 5], [64, 50]])])
    now = [0.0]
    capped = DeviceLoop(DeviceKind.CPU, clock=lambda: now[0], max_prefill_step_s=0.2)
    uncapped = DeviceLoop(DeviceKind.CPU, clock=lambda: now[0], max_prefill_step_s=math.inf)
    for dev in (capped, uncapped):
        dev.add_instance(make_instance(tiny, "a", profile=ms_per_token, max_num_batched_tokens=512))
        dev.add_instance(make_instance(tiny, "b", profile=ms_per_token, max_num_batched_tokens=512))
    assert capped.prefill_chunk_tokens(capped.instances["a"]) == 200  # before any step corrects the estimate
    assert uncapped.prefill_chunk_tokens(uncapped.instances["a"]) == 512
    for dev in (capped, uncapped):
        dev.instances["a"].engine.add_request(RequestId("long"), [3 + i % 300 for i in range(400)], GREEDY_4, now=0.0)
        dev.step()
    assert [len(q.token_ids) for q in capped.instances["a"].engine.last_plan.seqs] == [200]
    assert [len(q.token_ids) for q in uncapped.instances["a"].engine.last_plan.seqs] == [400]
    # the short prompt (TTFT due 0.475 s) goes before the rest of the long one (due ~4 s)
    capped.instances["b"].engine.add_request(RequestId("short"), [5, 6, 7, 8], GREEDY_4, now=0.0)
    grant, _ = capped.step()
    assert grant.instance_id == "b"
    with pytest.raises(ValueError, match="max_prefill_step_s"):
        DeviceLoop(max_prefill_step_s=0.0)


def test_a_short_prompt_overtakes_a_started_long_one_on_the_same_instance(tiny):
    # A 600-token prompt (TTFT due ~1.1 s) has run its first 200-token chunk when a 4-token prompt
    # for the same instance arrives, due at 0.2 + 0.475. Admission's replay serves prompts by
    # deadline and admits it; the engine must serve them in that order too. FCFS inside the
    # instance would give the short one its first token after the long prompt's 400 tokens left,
    # at ~0.6 s, late: admitted, then missed.
    ms_per_token = LatencyProfile.from_tables([[1, 1], [1000, 1000]], [(1, [[1, 5], [64, 50]])])
    now = [0.0]
    dev = DeviceLoop(DeviceKind.CPU, clock=lambda: now[0], max_prefill_step_s=0.2)
    dev.add_instance(make_instance(tiny, "a", profile=ms_per_token, max_num_batched_tokens=512, max_model_len=1024))
    eng = dev.instances["a"].engine
    eng.add_request(RequestId("long"), [3 + i % 300 for i in range(600)], GREEDY_4, now=0.0)
    dev.step()
    dev.instances["a"].estimator = LatencyEstimator(ms_per_token)  # forget that step's observed time
    now[0] = 0.2
    assert dev.admit("a", 4, now=0.2, max_tokens=4).admitted
    eng.add_request(RequestId("short"), [5, 6, 7, 8], GREEDY_4, now=0.2)
    dev.step()
    plan = {str(q.rid): (len(q.token_ids), q.sample) for q in eng.last_plan.seqs}
    assert plan["short"] == (4, True)  # its whole prompt and first token in this step
    assert sum(n for n, _ in plan.values()) <= 200  # within the step cap, the long prompt takes the rest
    assert eng.scheduler.get(RequestId("short")).first_token_s == 0.2


def test_admission_hands_back_a_longer_waiting_prompt_for_a_shorter_one(tiny):
    # 1.5 ms per prompt token. A 600-token prompt (0.9 s) waits, due at 600/512 x 0.95 = 1.11 s. A
    # 200-token one (0.3 s) due at 0.475 s runs first under EDF and would push it to 1.2 s: it fits
    # only if the long one gives way, which it may (0.9 s >= 1.5 x 0.3 s, no token out yet).
    flat = [[1, 5], [64, 50]]  # decode ms by batch, whatever the context
    slow = LatencyProfile.from_tables([[1, 1.5], [1000, 1500]], [(1, flat), (4096, flat)])
    long_prompt = [3 + i % 300 for i in range(600)]
    for displace in (False, True):
        dev = DeviceLoop(DeviceKind.CPU, clock=lambda: 0.0, displace=displace)
        dev.add_instance(make_instance(tiny, "a", profile=slow, max_num_batched_tokens=512, max_model_len=1024))
        dev.add_instance(make_instance(tiny, "b", profile=slow, max_num_batched_tokens=512, max_model_len=1024))
        dev.instances["a"].engine.add_request(RequestId("long"), long_prompt, GREEDY_4, now=0.0)
        d = dev.admit("b", 200, now=0.0, max_tokens=4)
        if not displace:
            assert not d.admitted and d.reason is RefusalReason.PREFILL and "long" in d.detail
            assert dev.take_handed_back() == [] and dev.instances["a"].engine.has_work
            continue
        assert d.admitted and d.displace == ("a", "long")
        [out] = dev.take_handed_back()
        assert out.rid == "long" and out.finish_reason.value == "preempted" and out.new_token_ids == ()
        assert out.continuation is not None and list(out.continuation.prompt_token_ids) == long_prompt
        assert out.continuation.output_token_ids == ()
        assert not dev.instances["a"].engine.has_work and dev.stats.displaced == 1
        assert dev.take_handed_back() == []


def test_a_decode_step_carries_no_prompt_due_later_than_a_prompt_elsewhere(tiny):
    # a decodes one stream (next token due 0.24 s) and holds a 300-token prompt due 0.56 s; b holds
    # a 100-token prompt due 0.475 s. EDF grants a for its decode. That step must not carry a's
    # prompt: the engine would fill it with those 300 tokens, ahead of b's earlier prompt, which
    # admission's replay (prompts by deadline across the device) never counted on.
    now = [0.0]
    dev = DeviceLoop(DeviceKind.CPU, clock=lambda: now[0])
    dev.add_instance(make_instance(tiny, "a", max_num_batched_tokens=512, max_model_len=1024))
    dev.add_instance(make_instance(tiny, "b", max_num_batched_tokens=512, max_model_len=1024))
    a, b = dev.instances["a"].engine, dev.instances["b"].engine
    a.add_request(RequestId("stream"), [5, 6, 7, 8], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True), now=0.0)
    dev.step()  # its prompt and first token
    a.add_request(RequestId("later"), [3 + i % 300 for i in range(300)], GREEDY_4, now=0.0)
    b.add_request(RequestId("sooner"), [3 + i % 100 for i in range(100)], GREEDY_4, now=0.0)
    grant, _ = dev.step()
    assert grant.instance_id == "a"
    assert [(str(q.rid), len(q.token_ids)) for q in a.last_plan.seqs] == [("stream", 1)]
    assert a.scheduler.get(RequestId("later")).num_computed_tokens == 0
    # With no earlier prompt elsewhere, a's decode step takes its prompt's chunk along as before.
    b.abort(RequestId("sooner"))
    dev.step()
    assert {str(q.rid) for q in a.last_plan.seqs} == {"stream", "later"}


# -- cached prompt prefixes: kept while idle, lent, taken back on demand -------------------------

def _run_to_end(dev):
    outs = []
    steps = 0
    while dev.has_work:
        _, o = dev.step()
        outs += o
        steps += 1
        assert steps < 5000
    dev.plan_memory()  # an idle tick
    return outs


def test_an_idle_instance_keeps_its_prompt_prefix_for_the_next_request(tiny):
    dev = DeviceLoop(DeviceKind.CPU, kv_budget_bytes=64 * make_instance(tiny, "p").engine.bytes_per_block)
    dev.add_instance(make_instance(tiny, "a", kv_cache_bytes=0))
    eng = dev.instances["a"].engine
    system = list(range(5, 85))  # 80 tokens: 5 blocks of 16
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    eng.add_request(RequestId("r1"), system + [200, 201], sp, now=0.0)
    first = [o for o in _run_to_end(dev) if o.rid == "r1"]
    assert eng.pool.num_used == 0 and eng.pool.num_cached >= 5  # idle, and the prefix is still there
    eng.add_request(RequestId("r2"), system + [210, 211, 212], sp, now=0.0)
    _run_to_end(dev)
    assert eng.scheduler.kv.hit_tokens == 80
    assert sum(len(o.new_token_ids) for o in first) == 8


def test_lent_prefix_memory_counts_as_free_and_is_taken_back_for_a_grow(tiny):
    bpb = make_instance(tiny, "p").engine.bytes_per_block
    budget = 24 * bpb
    dev = DeviceLoop(DeviceKind.CPU, kv_budget_bytes=budget, clock=lambda: 0.0)
    for iid in ("a", "b"):
        dev.add_instance(make_instance(tiny, iid, kv_cache_bytes=0, max_model_len=400))
    sp = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    dev.instances["a"].engine.add_request(RequestId("a1"), list(range(5, 5 + 300)), sp, now=0.0)
    _run_to_end(dev)
    a = dev.instances["a"]
    lent = a.lent_blocks(0)
    assert lent >= 18 and dev.actions.free == budget - lent * bpb  # a holds its prefix, lent
    # b's request needs 20 blocks: only lent memory can give them
    assert dev.admit("b", 300, now=0.0, max_tokens=4).admitted
    dev.instances["b"].engine.add_request(RequestId("b1"), [(7 * i) % 300 + 10 for i in range(300)], sp, now=0.0)
    outs = []
    while dev.has_work:
        assert dev.kv_bytes <= budget
        _, o = dev.step()
        outs += o
    assert [o.finish_reason.value for o in outs if o.finished] == ["length"]  # served, not evicted
    assert dev.peak_kv_bytes <= budget and a.lent_blocks(0) < lent  # a's cache gave way
    assert dev.instances["b"].engine.scheduler.num_running == 0


def test_a_prefix_moved_by_a_shrink_is_still_the_same_kv(tiny):
    """Compaction copies cached blocks down with the held ones: a request finding a moved
    prefix answers as one that computes it afresh."""
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    system = list(range(7, 7 + 64))
    eng = LLMEngine(tiny, EngineConfig(block_size=16, kv_cache_bytes=0))
    eng.resize_kv(30)
    eng.add_request(RequestId("pad"), list(range(100, 100 + 200)), sp, 0.0)  # takes the low blocks
    eng.add_request(RequestId("x"), system + [1, 2], sp, 0.0)
    while eng.has_work:
        eng.step()
    eng.resize_kv(6)  # the cached prefix blocks move down (or are dropped past what fits)
    assert eng.pool.num_cached == 6
    eng.add_request(RequestId("y"), system + [3], sp, 0.0)
    got = []
    while eng.has_work:
        got += [t for o in eng.step() for t in o.new_token_ids]
    assert eng.scheduler.kv.hit_tokens == 64
    fresh = LLMEngine(tiny, EngineConfig(block_size=16, prefix_caching=False))
    fresh.add_request(RequestId("y"), system + [3], sp, 0.0)
    want = []
    while fresh.has_work:
        want += [t for o in fresh.step() for t in o.new_token_ids]
    assert got == want


def test_a_prefix_held_by_a_running_request_is_reserved_once(tiny):
    """Two requests sharing a 160-token prompt prefix reserve its 10 blocks once: in the device's
    sizing, and in admission, where the second fits a budget the two could not fill apart."""
    from runtime.core.block_pool import PrefixHit
    from runtime.core.memory import MemoryConfig
    from runtime.core.request import SamplingParams

    bpb = make_instance(tiny, "p").engine.bytes_per_block
    dev = DeviceLoop(DeviceKind.CPU, kv_budget_bytes=22 * bpb, clock=lambda: 0.0,
                     memory=MemoryConfig(block_tokens=16, lookahead_tokens=16, watermark=1.0))
    # deadlines too loose to matter: this is about memory
    dev.add_instance(make_instance(tiny, "a", tpot_s=30.0, ttft_base_s=60.0, kv_cache_bytes=0, max_model_len=400))
    eng = dev.instances["a"].engine
    shared = [(5 * i) % 300 + 10 for i in range(160)]
    sp = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    eng.add_request(RequestId("r1"), shared + [1], sp, now=0.0)  # 161 + 16 tokens: 12 blocks
    dev.step()  # prefilled: its 10 full prefix blocks are named, and held
    assert eng.reserved_blocks(16) == 12
    second = shared + [2]
    hit = eng.prefix_hit(second, sp)
    assert hit == PrefixHit(tokens=160, held_blocks=10)
    # 12 blocks reserved apart, 2 with the prefix shared: 12 + 2 <= 22, where 12 + 12 is not
    assert dev.admit("a", len(second), now=0.0, max_tokens=16, prefix=hit).admitted
    assert not dev.admit("a", len(second), now=0.0, max_tokens=16).admitted
    eng.add_request(RequestId("r2"), second, sp, now=0.0)
    dev.step()
    assert eng.scheduler.kv.hit_tokens == 160
    assert eng.reserved_blocks(16) == 12 + 12 - 10
