"""Continuous batching policy, on the pure scheduler (no model)."""

from runtime.core.block_pool import BlockPool, KVCacheManager
from runtime.core.ids import RequestId
from runtime.core.request import FinishReason, Request, RequestStatus, SamplingParams
from runtime.core.scheduler import Scheduler, SchedulerConfig


def make_sched(blocks=16, block_size=4, budget=8, max_seqs=4, max_len=64):
    kv = KVCacheManager(BlockPool(blocks), block_size)
    return Scheduler(SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, max_model_len=max_len), kv)


def make_req(rid, n_prompt, max_tokens=4, eos=frozenset(), prompt=None):
    """A request whose prompt shares no prefix with another id's (unless ``prompt`` says so)."""
    base = 10 + 1000 * sum(map(ord, rid))
    return Request(RequestId(rid), prompt or tuple(range(base, base + n_prompt)),
                   SamplingParams(max_tokens=max_tokens, temperature=0), 0.0, eos_token_ids=eos)


def run_step(s, token=7):
    plan = s.schedule()
    sampled = {seq.rid: token for seq in plan.seqs if seq.sample}
    return plan, s.update(plan, sampled)


def test_long_prompt_is_prefilled_in_chunks_then_decodes():
    s = make_sched(budget=8)
    s.add(make_req("a", 20))
    plan, ups = run_step(s)
    assert [(q.start_pos, len(q.token_ids), q.sample) for q in plan.seqs] == [(0, 8, False)]
    assert ups == []
    plan, _ = run_step(s)
    assert [(q.start_pos, len(q.token_ids), q.sample) for q in plan.seqs] == [(8, 8, False)]
    plan, ups = run_step(s)
    assert [(q.start_pos, len(q.token_ids), q.sample) for q in plan.seqs] == [(16, 4, True)]
    assert ups[0].new_token_ids == (7,)
    plan, _ = run_step(s)  # decode: one token, the one just sampled
    assert [(q.start_pos, q.token_ids, q.sample) for q in plan.seqs] == [(20, (7,), True)]
    assert plan.seqs[0].block_ids == (0, 1, 2, 3, 4, 5)


def test_requests_join_between_steps_and_leave_when_done():
    s = make_sched(budget=16)
    s.add(make_req("a", 3, max_tokens=2))
    run_step(s)
    s.add(make_req("b", 3, max_tokens=3))
    plan, ups = run_step(s)
    assert [q.rid for q in plan.seqs] == ["a", "b"]
    assert ups[0].finish_reason is FinishReason.LENGTH  # a: 2 tokens
    plan, ups = run_step(s)
    assert [q.rid for q in plan.seqs] == ["b"]
    plan, ups = run_step(s)
    assert ups[0].finish_reason is FinishReason.LENGTH
    assert not s.has_work and s.kv.pool.num_free == 16


def test_eos_finishes_and_frees_blocks():
    s = make_sched()
    s.add(make_req("a", 3, max_tokens=10, eos=frozenset({7})))
    _, ups = run_step(s, token=7)
    assert ups[0].finish_reason is FinishReason.STOP
    assert s.kv.pool.num_used == 0


def test_max_num_seqs_caps_the_batch():
    s = make_sched(budget=64, max_seqs=2)
    for r in "abc":
        s.add(make_req(r, 2))
    plan, _ = run_step(s)
    assert [q.rid for q in plan.seqs] == ["a", "b"]
    assert s.num_waiting == 1


def test_out_of_blocks_preempts_newest_and_recomputes_it():
    # 4 blocks of 4 tokens; two requests of 7 prompt tokens take 2 blocks each.
    s = make_sched(blocks=4, block_size=4, budget=32)
    s.add(make_req("a", 7, max_tokens=8))
    s.add(make_req("b", 7, max_tokens=8))
    run_step(s)  # both prefilled: 7 tokens computed in 2 blocks, 1 sampled
    plan, _ = run_step(s)  # position 7 still fits in 2 blocks
    assert plan.preempted == ()
    plan, _ = run_step(s)  # position 8 needs a 3rd block for a -> b is preempted
    assert plan.preempted == ("b",)
    assert [q.rid for q in plan.seqs] == ["a"]
    b = s.get(RequestId("b"))
    assert b is not None and b.status is RequestStatus.WAITING and b.num_computed_tokens == 0
    assert b.output_token_ids == [7, 7]  # generated tokens are kept and recomputed as prompt
    # b's full first block (2) stays cached for its recompute; a's third block is the free one
    assert s.kv.block_table(RequestId("a")) == [0, 1, 3]
    assert s.kv.pool.num_cached == 1


def test_finish_while_running_frees_blocks_and_ignores_stale_results():
    s = make_sched()
    s.add(make_req("a", 5))
    plan = s.schedule()
    assert s.finish(RequestId("a"), FinishReason.ABORT)
    assert s.update(plan, {RequestId("a"): 7}) == []
    assert s.kv.pool.num_used == 0 and not s.has_work
    assert not s.finish(RequestId("a"), FinishReason.ABORT)


def test_prompt_at_the_context_limit_is_refused():
    s = make_sched(max_len=8)
    try:
        s.add(make_req("a", 8))
    except ValueError as e:
        assert "limit is 7" in str(e)
    else:
        raise AssertionError("expected ValueError")


def test_waiting_prompt_prefills_in_smaller_chunks_when_blocks_are_short():
    s = make_sched(blocks=3, block_size=4, budget=32)
    s.add(make_req("a", 6, max_tokens=1))  # 2 blocks
    s.add(make_req("b", 10, max_tokens=1))  # needs 3 blocks; only 1 left
    plan, _ = run_step(s)
    assert [(q.rid, len(q.token_ids)) for q in plan.seqs] == [("a", 6), ("b", 4)]


def test_prefill_budget_caps_chunks_but_never_a_decode():
    # a decodes; b (running, mid-prefill) sits before c in the queue order; c waits to prefill.
    s = make_sched(budget=16, blocks=32)
    s.add(make_req("a", 2, max_tokens=8))
    run_step(s)  # a's prefill: a now decodes
    s.add(make_req("b", 20))
    s.add(make_req("c", 6))
    plan = s.schedule(prefill_budget=4)
    assert [(str(q.rid), len(q.token_ids)) for q in plan.seqs] == [("a", 1), ("b", 4)]
    s.update(plan, {q.rid: 7 for q in plan.seqs if q.sample})
    plan = s.schedule(prefill_budget=0)  # no prompt tokens at all: the decode still runs
    assert [(str(q.rid), len(q.token_ids)) for q in plan.seqs] == [("a", 1)]
    s.update(plan, {q.rid: 7 for q in plan.seqs if q.sample})
    plan = s.schedule()  # uncapped: the step budget (16) alone limits the chunks
    assert [(str(q.rid), len(q.token_ids)) for q in plan.seqs] == [("a", 1), ("b", 15)]


def test_prefill_key_gives_the_chunk_to_the_earliest_deadline_even_past_a_started_prompt():
    # b's long prompt has started; c arrives later with an earlier deadline. FCFS would finish b's
    # prompt first (c's first token after all of it); by key, c's prompt goes first.
    deadline = {"a": 0.0, "b": 9.0, "c": 1.0}
    key = lambda r: deadline[str(r.rid)]  # noqa: E731
    s = make_sched(budget=16, blocks=32)
    s.add(make_req("a", 2, max_tokens=8))
    run_step(s)  # a decodes from now on
    s.add(make_req("b", 30))
    plan = s.schedule(prefill_budget=8, prefill_key=key)
    assert [(str(q.rid), len(q.token_ids)) for q in plan.seqs] == [("a", 1), ("b", 8)]
    s.update(plan, {q.rid: 7 for q in plan.seqs if q.sample})
    s.add(make_req("c", 6))
    plan = s.schedule(prefill_budget=8, prefill_key=key)
    assert [(str(q.rid), len(q.token_ids)) for q in plan.seqs] == [("a", 1), ("c", 6), ("b", 2)]
    ups = s.update(plan, {q.rid: 7 for q in plan.seqs if q.sample})
    assert {str(u.rid) for u in ups if u.new_token_ids} == {"a", "c"}  # c's first token, b still prefilling
    # Without a key the same state goes FCFS: b's started prompt first.
    s2 = make_sched(budget=16, blocks=32)
    s2.add(make_req("b", 30))
    run_step(s2)
    s2.add(make_req("c", 6))
    plan = s2.schedule(prefill_budget=8)
    assert [(str(q.rid), len(q.token_ids)) for q in plan.seqs] == [("b", 8)]


def test_prefill_key_orders_waiting_prompts_and_keeps_decodes_first():
    deadline = {"x": 5.0, "y": 2.0, "z": 3.0}
    s = make_sched(budget=8, blocks=32)
    for rid in ("x", "y", "z"):
        s.add(make_req(rid, 4))
    plan = s.schedule(prefill_key=lambda r: deadline[str(r.rid)])
    assert [str(q.rid) for q in plan.seqs] == ["y", "z"]  # x arrived first but is due last
    s.update(plan, {q.rid: 7 for q in plan.seqs if q.sample})
    plan = s.schedule(prefill_key=lambda r: deadline[str(r.rid)])
    assert [(str(q.rid), len(q.token_ids)) for q in plan.seqs] == [("y", 1), ("z", 1), ("x", 4)]


def test_prefill_key_preempts_only_requests_not_yet_in_the_step():
    # 4 blocks of 4 tokens: a (decoding, 8 tokens: 2 blocks held) and b (started, 4 of 12 computed:
    # 1 block). c, due first, needs 2 blocks for its prompt: only 1 is free.
    deadline = {"a": 0.0, "b": 9.0, "c": 1.0}
    s = make_sched(blocks=4, block_size=4, budget=16)
    s.add(make_req("a", 7, max_tokens=8))
    run_step(s)
    s.add(make_req("b", 12))
    plan = s.schedule(prefill_budget=4)
    s.update(plan, {q.rid: 7 for q in plan.seqs if q.sample})
    s.add(make_req("c", 8))
    plan = s.schedule(prefill_key=lambda r: deadline[str(r.rid)])
    rids = [str(q.rid) for q in plan.seqs]
    assert rids[0] == "a"  # the decode is in the step and never a victim
    assert "a" not in plan.preempted
    for q in plan.seqs:  # every planned sequence still holds the blocks it was planned with
        assert s.get(q.rid).status is RequestStatus.RUNNING
        assert tuple(s.kv.block_table(q.rid)) == q.block_ids


def test_a_request_shares_a_cached_prefix_and_a_blocked_one_is_counted_once():
    s = make_sched(blocks=12, block_size=4, budget=32)
    shared = tuple(range(500, 512))  # 12 tokens: 3 blocks
    s.add(make_req("a", 0, max_tokens=2, prompt=shared + (1, 2)))
    while s.has_work:
        run_step(s)
    s.add(make_req("b", 0, max_tokens=2, prompt=shared + (3, 4, 5, 6, 7, 8, 9, 10)))
    for _ in range(3):  # no prompt tokens allowed in these steps: b matches, cannot start, waits
        plan = s.schedule(prefill_budget=0)
        assert plan.empty and s.kv.pool.num_used == 0
    assert s.kv.hit_tokens == 0
    plan, _ = run_step(s)
    (seq,) = plan.seqs
    assert (seq.rid, seq.start_pos, len(seq.token_ids)) == ("b", 12, 8)  # its prefill starts after the prefix
    assert s.kv.hit_tokens == 12 and s.get(RequestId("b")).num_cached_tokens == 12


def test_requests_that_share_a_first_block_wait_a_step_for_the_one_computing_it():
    s = make_sched(blocks=32, block_size=4, budget=64, max_seqs=8)
    shared = tuple(range(600, 612))  # 3 blocks
    for rid, tail in (("a", (1, 2)), ("b", (3, 4)), ("c", (5, 6))):
        s.add(make_req(rid, 0, max_tokens=2, prompt=shared + tail))
    s.add(make_req("other", 6))  # nothing in common: not held back
    plan, _ = run_step(s)
    assert [(q.rid, q.start_pos) for q in plan.seqs] == [("a", 0), ("other", 0)]  # b and c wait
    plan, _ = run_step(s)
    got = {q.rid: (q.start_pos, len(q.token_ids)) for q in plan.seqs}
    assert got["b"] == (12, 2) and got["c"] == (12, 2)  # the prefix a computed, shared
    assert s.kv.hit_tokens == 24


def test_a_request_due_sooner_does_not_wait_for_a_later_one_computing_its_prefix():
    s = make_sched(blocks=32, block_size=4, budget=64, max_seqs=8)
    shared = tuple(range(600, 612))
    due = {"late": 5.0, "soon": 1.0}
    s.add(make_req("late", 0, max_tokens=2, prompt=shared + (1,)))
    s.add(make_req("soon", 0, max_tokens=2, prompt=shared + (2,)))
    plan = s.schedule(prefill_key=lambda r: due[str(r.rid)])
    assert [q.rid for q in plan.seqs] == ["soon"]  # by key it goes first, and late waits for its blocks
