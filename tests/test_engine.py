"""The engine on real weights: greedy equality with HF, continuous batching, KV accounting."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from runtime.core.ids import RequestId
from runtime.core.request import FinishReason, SamplingParams
from runtime.engine.engine import EngineConfig, LLMEngine, PromptTooLongError
from runtime.models.loader import load_model

GREEDY = SamplingParams(max_tokens=24, temperature=0)


def run_all(engine: LLMEngine, arrivals: dict[int, list[tuple[str, list[int], SamplingParams]]]) -> dict[str, list[int]]:
    """Step the engine; requests in arrivals[k] join before step k. Returns tokens per request."""
    out: dict[str, list[int]] = {}
    step = 0
    while engine.has_work or any(k >= step for k in arrivals):
        for rid, ids, params in arrivals.get(step, []):
            engine.add_request(RequestId(rid), ids, params, now=float(step))
            out[rid] = []
        for o in engine.step():
            out[o.rid].extend(o.new_token_ids)
        step += 1
        assert step < 10_000
    return out


def solo(loaded, ids, params, **cfg) -> list[int]:
    eng = LLMEngine(loaded, EngineConfig(**cfg))
    return run_all(eng, {0: [("x", ids, params)]})["x"]


# -- real model: token-for-token equality with transformers -----------------------------------

@pytest.fixture(scope="module")
def smol():
    return load_model("bundled:smollm2-135m-instruct")


@pytest.fixture(scope="module")
def hf_smol(smol):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(smol.folder), dtype=torch.float32).eval()


LONG_TEXT = (
    "The history of astronomy spans thousands of years. Early civilizations tracked the motions of "
    "the Sun, the Moon and the planets to build calendars, and the Greeks proposed geometric models "
    "of the heavens. Centuries later, telescopes revealed moons around Jupiter and phases of Venus. "
)


@pytest.mark.slow
@pytest.mark.parametrize(
    "case,messages,cfg",
    [
        ("short", [{"role": "user", "content": "What is the capital of France?"}], {}),
        # 16-token blocks: the ~70-token prompt spans several blocks.
        ("multi-block", [{"role": "user", "content": "Summarize: " + LONG_TEXT}], {"block_size": 16}),
        # 40-token chunks: the 185-token prompt is prefilled in 5 iterations.
        ("chunked", [{"role": "user", "content": "Summarize: " + LONG_TEXT * 3}],
         {"block_size": 16, "max_num_batched_tokens": 40}),
    ],
)
def test_greedy_matches_hf_generate(smol, hf_smol, case, messages, cfg):
    eng = LLMEngine(smol, EngineConfig(**cfg))
    ids = eng.encode_prompt(eng.render_chat(messages))
    bs = cfg.get("block_size", 32)
    if case == "multi-block":
        assert len(ids) > 2 * bs
    if case == "chunked":
        assert len(ids) > 4 * cfg["max_num_batched_tokens"]
    ours = run_all(eng, {0: [("a", ids, GREEDY)]})["a"]
    with torch.inference_mode():
        ref = hf_smol.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                               max_new_tokens=GREEDY.max_tokens, do_sample=False)
    assert ours == ref[0, len(ids):].tolist()
    assert eng.kv_blocks_used == 0


@pytest.mark.slow
def test_smollm2_answers_paris(smol):
    eng = LLMEngine(smol)
    ids = eng.encode_prompt(eng.render_chat([{"role": "user", "content": "What is the capital of France?"}]))
    eng.add_request(RequestId("a"), ids, GREEDY, 0.0)
    text = []
    while eng.has_work:
        text.extend(o.text for o in eng.step())
    assert "Paris" in "".join(text)


@pytest.mark.slow
def test_bfloat16_smollm2_matches_hf_in_bfloat16_at_half_the_memory(smol):
    from transformers import AutoModelForCausalLM

    from functions import Dtype

    half = load_model("bundled:smollm2-135m-instruct", Dtype.BFLOAT16)
    assert half.model.dtype is torch.bfloat16 and half.model.embed.dtype is torch.bfloat16
    eng = LLMEngine(half)
    assert eng.bytes_per_block * 2 == LLMEngine(smol).bytes_per_block  # the KV too
    assert eng.cache.k[0].dtype is torch.bfloat16
    ids = eng.encode_prompt(eng.render_chat([{"role": "user", "content": "What is the capital of France?"}]))
    ours = run_all(eng, {0: [("a", ids, GREEDY)]})["a"]
    assert "Paris" in eng.tokenizer.decode(ours)
    hf = AutoModelForCausalLM.from_pretrained(str(half.folder), dtype=torch.bfloat16).eval()
    with torch.inference_mode():
        ref = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=GREEDY.max_tokens, do_sample=False)
    assert ours == ref[0, len(ids):].tolist()


@pytest.mark.slow
def test_int8_smollm2_still_answers_and_holds_under_two_fifths_of_float32s_weights(smol):
    from functions import Dtype

    small = load_model("bundled:smollm2-135m-instruct", Dtype.INT8)
    assert small.model.nbytes < 0.4 * smol.model.nbytes
    eng = LLMEngine(small)
    ids = eng.encode_prompt(eng.render_chat([{"role": "user", "content": "What is the capital of France?"}]))
    out = run_all(eng, {0: [("a", ids, GREEDY)]})["a"]
    assert "Paris" in eng.tokenizer.decode(out)
    # its first tokens are float32's: the rounding moves the logits, not the answer
    assert out[:5] == run_all(LLMEngine(smol), {0: [("a", ids, GREEDY)]})["a"][:5]


# -- random models: batching equals solo, KV never leaks ---------------------------------------

@pytest.fixture(scope="module", params=["random:llama-tiny?seed=0", "random:qwen2-tiny?seed=3"])
def tiny(request):
    return load_model(request.param)


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 259, (int(torch.randint(3, 90, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def test_batch_with_joins_and_leaves_equals_each_alone(tiny):
    cfg = {"block_size": 16, "max_num_batched_tokens": 64}
    ps = prompts(6)
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in (5, 30, 12, 40, 3, 20)]
    arrivals: dict[int, list] = {}
    for i, (p, sp) in enumerate(zip(ps, params, strict=True)):
        arrivals.setdefault(i * 3, []).append((f"r{i}", p, sp))  # joins mid-flight
    eng = LLMEngine(tiny, EngineConfig(**cfg))
    batched = run_all(eng, arrivals)
    for i, (p, sp) in enumerate(zip(ps, params, strict=True)):
        assert batched[f"r{i}"] == solo(tiny, p, sp, **cfg), f"request {i} differs"
        assert len(batched[f"r{i}"]) == sp.max_tokens
    assert eng.kv_blocks_used == 0


def test_preemption_under_a_tiny_kv_pool_recomputes_exactly(tiny):
    # 12 blocks of 16 tokens: 6 requests growing to ~100 tokens each cannot all fit.
    per_block = 2 * tiny.config.num_layers * 16 * tiny.config.num_kv_heads * tiny.config.head_dim * 4
    cfg = {"block_size": 16, "kv_cache_bytes": 12 * per_block, "max_num_batched_tokens": 128}
    ps = prompts(6, seed=1)
    sp = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    eng = LLMEngine(tiny, EngineConfig(**cfg))
    assert eng.kv_blocks_total == 12
    preempted = 0
    out: dict[str, list[int]] = {}
    for i, p in enumerate(ps):
        eng.add_request(RequestId(f"r{i}"), p, sp, 0.0)
        out[f"r{i}"] = []
    while eng.has_work:
        for o in eng.step():
            out[o.rid].extend(o.new_token_ids)
        assert eng.last_plan is not None
        preempted += len(eng.last_plan.preempted)
        assert eng.kv_blocks_used <= eng.kv_blocks_total
    assert preempted > 0
    for i, p in enumerate(ps):
        assert out[f"r{i}"] == solo(tiny, p, sp, block_size=16)
    assert eng.kv_blocks_used == 0


def test_abort_frees_blocks_at_once_mid_prefill_and_mid_decode(tiny):
    eng = LLMEngine(tiny, EngineConfig(block_size=16, max_num_batched_tokens=32))
    sp = SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)
    eng.add_request(RequestId("decoding"), prompts(1, seed=5)[0][:10], sp, 0.0)
    eng.step()
    eng.step()
    eng.add_request(RequestId("prefilling"), list(range(3, 203)), sp, 0.0)  # 200 tokens, 32 per step
    eng.add_request(RequestId("waiting"), [5, 6, 7], sp, 0.0)
    eng.step()
    assert len(eng.scheduler.kv.block_table(RequestId("prefilling"))) > 0
    assert eng.abort(RequestId("prefilling"))
    assert eng.abort(RequestId("decoding"))
    assert eng.abort(RequestId("waiting"))
    assert eng.kv_blocks_used == 0 and not eng.has_work
    assert not eng.abort(RequestId("decoding"))


def test_prompt_too_long_is_refused_with_the_limit(tiny):
    eng = LLMEngine(tiny, EngineConfig(max_model_len=64))
    with pytest.raises(PromptTooLongError, match="64"):
        eng.add_request(RequestId("a"), list(range(3, 67)), GREEDY, 0.0)
    assert not eng.has_work


def test_context_limit_ends_with_length(tiny):
    eng = LLMEngine(tiny, EngineConfig(max_model_len=40))
    outs = run_all(eng, {0: [("a", list(range(3, 33)), SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))]})
    assert len(outs["a"]) == 10  # 30 prompt + 10 = the 40-token limit


def test_seeded_sampling_is_reproducible_and_top_p_tiny_is_greedy(tiny):
    p = prompts(1, seed=9)[0]
    a = solo(tiny, p, SamplingParams(max_tokens=20, temperature=1.0, seed=11, ignore_eos=True))
    b = solo(tiny, p, SamplingParams(max_tokens=20, temperature=1.0, seed=11, ignore_eos=True))
    assert a == b
    g = solo(tiny, p, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    nucleus = solo(tiny, p, SamplingParams(max_tokens=20, temperature=1.0, top_p=1e-6, seed=1, ignore_eos=True))
    assert nucleus == g


def test_stop_string_ends_text_before_it(tiny):
    eng = LLMEngine(tiny)
    p = prompts(1, seed=2)[0]
    full = LLMEngine(tiny)
    full.add_request(RequestId("f"), p, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True), 0.0)
    text = ""
    while full.has_work:
        text += "".join(o.text for o in full.step())
    stop = text[10:12]
    assert stop and len(text) > 12
    eng.add_request(RequestId("s"), p, SamplingParams(max_tokens=30, temperature=0, stop=(stop,), ignore_eos=True), 0.0)
    got, reason = "", None
    while eng.has_work:
        for o in eng.step():
            got += o.text
            reason = o.finish_reason or reason
    assert got == text[: text.find(stop)]
    assert reason is FinishReason.STOP
    assert eng.kv_blocks_used == 0


def test_eviction_returns_a_continuation_that_resumes_to_the_same_greedy_output(tiny):
    p = prompts(3, seed=4)
    sp = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    eng = LLMEngine(tiny, EngineConfig(block_size=16))
    for i, ids in enumerate(p):
        eng.add_request(RequestId(f"r{i}"), ids, sp, 0.0)
    got: dict[str, list[int]] = {f"r{i}": [] for i in range(3)}
    for _ in range(12):
        for o in eng.step():
            got[o.rid].extend(o.new_token_ids)
    evicted = eng.evict_all()
    assert {o.rid for o in evicted} == set(got)
    assert eng.kv_blocks_used == 0 and not eng.has_work
    for o in evicted:
        assert o.finish_reason is FinishReason.PREEMPTED and o.continuation is not None
        assert list(o.continuation.output_token_ids) == got[o.rid] and len(got[o.rid]) > 0
        ids, params = o.continuation.resume()
        assert params.max_tokens == 30 - len(got[o.rid])
        other = LLMEngine(tiny, EngineConfig(block_size=16))  # "another instance"
        resumed = run_all(other, {0: [("c", ids, params)]})["c"]
        i = int(o.rid[1:])
        assert got[o.rid] + resumed == solo(tiny, p[i], sp, block_size=16)


@pytest.mark.slow
def test_smollm2_eviction_continuation_equals_uninterrupted(smol):
    eng = LLMEngine(smol)
    ids = eng.encode_prompt(eng.render_chat([{"role": "user", "content": "Write a short poem about the sea."}]))
    sp = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    eng.add_request(RequestId("a"), ids, sp, 0.0)
    first: list[int] = []
    for _ in range(11):
        for o in eng.step():
            first.extend(o.new_token_ids)
    (out,) = eng.evict_all()
    assert out.continuation is not None
    resumed_ids, params = out.continuation.resume()
    rest = run_all(LLMEngine(smol), {0: [("b", resumed_ids, params)]})["b"]
    assert first + rest == solo(smol, ids, sp)


# -- logit adjustments (OpenAI's logit_bias, presence and frequency penalties) ------------------
@pytest.mark.parametrize(("params", "generated", "want"), [
    # logits [1.0, 0.9, 0.0, 0.5]; token 0 was generated twice, token 3 once
    ({}, [0, 0, 3], 0),
    ({"frequency_penalty": 0.04}, [0, 0, 3], 0),  # 1.0 - 2 x 0.04 = 0.92 > 0.9
    ({"frequency_penalty": 0.06}, [0, 0, 3], 1),  # 0.88 < 0.9
    ({"presence_penalty": 0.09}, [0, 0, 3], 0),  # once, whatever the count: 0.91
    ({"presence_penalty": 0.11}, [0, 0, 3], 1),
    ({"frequency_penalty": -0.3}, [3, 3, 3], 3),  # a negative penalty rewards: 0.5 + 0.9 > 1.0
    ({"logit_bias": ((2, 1.5),)}, [], 2),
    ({"logit_bias": ((0, -100.0),)}, [], 1),
    ({"logit_bias": ((1, 0.2),), "presence_penalty": 0.05}, [0], 1),  # 1.1 > 0.95: bias, then penalty
])
def test_logit_adjustments_follow_openai_s_definition(params, generated, want):
    from runtime.engine.sampler import sample

    logits = torch.tensor([[1.0, 0.9, 0.0, 0.5]])
    p = SamplingParams(temperature=0, **params)
    assert sample(logits, [p], [None], [generated]) == [want]
    # sampled rows see the same logits: at a low temperature the argmax is all but certain
    g = torch.Generator().manual_seed(0)
    assert sample(logits, [SamplingParams(temperature=0.001, **params)], [g], [generated]) == [want]


def test_a_banned_token_is_never_sampled():
    from runtime.engine.sampler import sample

    logits = torch.tensor([[3.0, 0.0, 0.0]])
    g = torch.Generator().manual_seed(1)
    p = SamplingParams(temperature=2.0, logit_bias=((0, -100.0),))
    assert 0 not in [sample(logits, [p], [g])[0] for _ in range(200)]


def test_penalties_count_a_continued_stream_s_resumed_tokens(tiny, monkeypatch):
    # A continued stream's last `resumed_tokens` prompt ids were generated (elsewhere); penalties
    # must count them, or the continuation would not be the stream it continues.
    import runtime.engine.engine as engine_mod

    seen: list[list[int]] = []

    def spy(logits, params, generators, generated=None, allowed=None, biases=None):
        seen.extend(list(g) for g, p in zip(generated or [], params, strict=True) if p.penalized)
        return real(logits, params, generators, generated, allowed, biases)

    real = engine_mod.sample
    monkeypatch.setattr(engine_mod, "sample", spy)
    eng = LLMEngine(tiny)
    prompt, resumed = [5, 6, 7, 8], [40, 41, 40]
    sp = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, frequency_penalty=1.0,
                        resumed_tokens=len(resumed))
    out = run_all(eng, {0: [("a", prompt + resumed, sp)]})["a"]
    assert seen == [resumed, resumed + out[:1], resumed + out[:2]]
    seen.clear()
    run_all(eng, {0: [("b", prompt, replace(sp, resumed_tokens=0))]})
    assert seen[0] == []  # a fresh request has generated nothing


def test_a_grammar_s_mask_leaves_only_the_tokens_it_allows():
    from runtime.engine.sampler import sample

    logits = torch.tensor([[1.0, 0.9, 0.0, 0.5]])
    allowed = torch.tensor([False, False, True, True])
    assert sample(logits, [SamplingParams(temperature=0)], [None], None, [allowed]) == [3]
    # with a bias that would pick a masked token, the mask still wins
    biased = SamplingParams(temperature=0, logit_bias=((0, 100.0),))
    assert sample(logits, [biased], [None], [()], [allowed]) == [3]
    g = torch.Generator().manual_seed(2)
    hot = SamplingParams(temperature=2.0)
    assert {sample(logits, [hot], [g], None, [allowed])[0] for _ in range(200)} == {2, 3}


def test_a_grammar_that_fails_midway_ends_its_request_only(tiny, monkeypatch):
    # llguidance may fail mid-generation (resource limits, a dead end): that request stops there;
    # the step does not raise (an exception there would evict every request of the instance).
    from runtime.engine import structured

    class Failing:
        """A matcher that allows every token, then, after 3, none; or rejects the 3rd token."""

        def __init__(self, how: str) -> None:
            self.how, self.n = how, 0

        def consume_tokens(self, ids):
            return True

        def consume_token(self, t):
            self.n += 1
            return not (self.how == "reject" and self.n == 3)

        def is_error(self):
            return False

        def get_error(self):
            return "simulated"

        def is_stopped(self):
            return False

        def unsafe_compute_mask_ptr(self, ptr, size):
            import ctypes

            ctypes.memset(ptr, 0xFF if self.n < 3 else 0, size)

    eng = LLMEngine(tiny)
    for how in ("empty-mask", "reject"):
        monkeypatch.setattr(eng.grammars, "guide", lambda g, r=(), e=(), how=how: structured.Guide(Failing(how), eng.grammars.vocab_size, r, e))
        free = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
        guided = replace(free, grammar="(any)")
        out = run_all(eng, {0: [("free", [5, 6, 7], free), ("guided", [5, 6, 7], guided)]})
        assert out["free"] == solo(tiny, [5, 6, 7], free)  # its neighbour is untouched
        assert 3 <= len(out["guided"]) <= 4  # ended by the grammar's failure, not max_tokens
        if how == "empty-mask":
            assert out["guided"][-1] in eng.eos_ids  # only end-of-sequence was left to it


def test_requests_with_one_grammar_keep_their_own_place_in_it(tiny):
    # Each request's guide is a copy of the compiled grammar, not the grammar's own state.
    schema = {"type": "object", "required": ["w"], "additionalProperties": False,
              "properties": {"w": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 4}}}
    eng = LLMEngine(tiny)
    sp = SamplingParams(max_tokens=80, temperature=0, grammar=eng.grammars.compile(schema))
    assert LLMEngine(tiny).grammars is eng.grammars  # instances of one checkpoint share its compiled grammars
    prompts = {"a": [5, 6, 7], "b": [9, 9, 30, 41], "c": [12]}
    together = run_all(eng, {0: [(k, p, sp) for k, p in prompts.items()]})
    for k, p in prompts.items():
        alone = run_all(LLMEngine(tiny), {0: [(k, p, sp)]})[k]
        assert together[k] == alone, k
        assert isinstance(json.loads(tiny.tokenizer.decode(alone, skip_special_tokens=True))["w"], list)


def test_a_logit_bias_is_built_into_tensors_once_per_request(tiny, monkeypatch):
    # A vocabulary-wide bias rebuilt every step would cost the shared device ~25 ms a token.
    import runtime.engine.engine as engine_mod
    import runtime.engine.sampler as sampler_mod

    built = []

    def counting(p):
        built.append(p)
        return real(p)

    real = sampler_mod.bias_tensors
    monkeypatch.setattr(engine_mod, "bias_tensors", counting)
    monkeypatch.setattr(sampler_mod, "bias_tensors", counting)
    sp = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True,
                        logit_bias=tuple((i, -100.0) for i in range(tiny.config.vocab_size) if i != 40))
    out = run_all(LLMEngine(tiny), {0: [("a", [5, 6, 7], sp)]})["a"]
    assert out == [40] * 10 and len(built) == 1


@pytest.mark.parametrize("chunk", [16, 512])
def test_prompt_logprobs_score_each_prompt_token_once_in_any_chunking(tiny, chunk):
    # Position i's logits predict token i + 1: the prompt's tokens but the first get a logprob,
    # computed as the prompt is prefilled, however it is cut into chunks.
    prompt = [(7 * i + 3) % 300 + 10 for i in range(50)]
    sp = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True, prompt_logprobs=3)
    eng = LLMEngine(tiny, EngineConfig(block_size=16, max_num_batched_tokens=chunk))
    eng.add_request(RequestId("a"), prompt, sp, 0.0)
    outs = []
    while eng.has_work:
        outs += eng.step()
    got = [lp for o in outs for lp in o.prompt_logprobs]
    assert [t.token_id for t in got] == prompt[1:]
    assert len(outs[0].prompt_logprobs) == 49 and all(not o.prompt_logprobs for o in outs[1:])
    # the same numbers as a request whose prompt ends just before the token, asked for its own
    for j in (1, 17, 33, 49):
        forced = SamplingParams(max_tokens=1, temperature=0, logprobs=0, logit_bias=((prompt[j], 100.0),))
        e2 = LLMEngine(tiny)
        e2.add_request(RequestId("b"), prompt[:j], forced, 0.0)
        (o,) = e2.step()
        assert o.logprobs[0].token_id == prompt[j]
        assert o.logprobs[0].logprob == pytest.approx(got[j - 1].logprob, abs=1e-4)
        assert len(got[j - 1].top) == 3


# -- prefix caching ------------------------------------------------------------------------------

def _count_computed(eng: LLMEngine) -> list[int]:
    """Tokens each step computes, recorded as the runner executes them."""
    seen: list[int] = []
    execute = eng.runner.execute

    def counting(plan, score=None):
        seen.append(plan.num_tokens)
        return execute(plan, score)

    eng.runner.execute = counting  # type: ignore[method-assign]
    return seen


def _cached_and_plain(loaded, cfg, arrivals) -> tuple[LLMEngine, int]:
    """Run the arrivals with prefix caching and without: the answers must be the same. Returns
    the caching engine and how many fewer tokens it computed."""
    cached = LLMEngine(loaded, EngineConfig(**cfg))
    plain = LLMEngine(loaded, EngineConfig(**cfg, prefix_caching=False))
    work_cached, work_plain = _count_computed(cached), _count_computed(plain)
    assert run_all(cached, arrivals) == run_all(plain, arrivals)
    return cached, sum(work_plain) - sum(work_cached)


def test_requests_sharing_a_prefix_compute_it_once_and_answer_as_without_caching(tiny):
    cfg = {"block_size": 16, "max_num_batched_tokens": 64}
    system = prompts(1, seed=7)[0][:80] + [5] * max(0, 80 - len(prompts(1, seed=7)[0]))  # 80 shared tokens
    users = prompts(5, seed=8)
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in (6, 20, 9, 14, 4)]
    # r0 alone first; r1, r2 together once r0 has gone; r3 and r4 while r1 and r2 still run
    steps = (0, 30, 30, 34, 35)
    arrivals: dict[int, list] = {}
    for i, (u, sp, at) in enumerate(zip(users, params, steps, strict=True)):
        arrivals.setdefault(at, []).append((f"r{i}", system + u[:20], sp))
    cached, saved = _cached_and_plain(tiny, cfg, arrivals)
    # four of the five find the 80-token prefix's 5 full blocks: 4 x 80 tokens not computed again
    assert cached.scheduler.kv.hit_tokens == saved == 4 * 80
    assert cached.kv_blocks_used == 0 and cached.pool.num_cached > 0


def test_a_cold_burst_computes_its_shared_prefix_once(tiny):
    """Four requests with one 80-token system prompt arrive together, nothing cached: the first
    computes the prefix, the others wait one step and share it."""
    cfg = {"block_size": 16, "max_num_batched_tokens": 512}
    system = [(11 * i) % 250 + 5 for i in range(80)]
    arrivals = {0: [(f"r{i}", system + u[:10], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
                    for i, u in enumerate(prompts(4, seed=12))]}
    cached, saved = _cached_and_plain(tiny, cfg, arrivals)
    assert cached.scheduler.kv.hit_tokens == saved == 3 * 80


def test_prompt_logprobs_never_use_cached_blocks(tiny):
    """Scoring a prompt needs the logits at every position: nothing may be skipped."""
    cfg = {"block_size": 16}
    p = prompts(1, seed=9)[0] + prompts(1, seed=10)[0]
    eng = LLMEngine(tiny, EngineConfig(**cfg))
    run_all(eng, {0: [("a", p, SamplingParams(max_tokens=2, temperature=0))]})
    scored = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=0)
    # what admission is told: the cached prefix, unless the prompt is to be scored
    assert eng.prefix_hit(p, SamplingParams()).tokens == (len(p) - 1) // 16 * 16
    assert eng.prefix_hit(p, scored).tokens == 0
    outs = []
    eng.add_request(RequestId("b"), p, scored, 0.0)
    while eng.has_work:
        outs.extend(eng.step())
    assert eng.scheduler.kv.hit_tokens == 0
    assert [lp.token_id for o in outs for lp in o.prompt_logprobs] == p[1:]
    run_all(eng, {0: [("c", p, SamplingParams(max_tokens=2, temperature=0))]})
    assert eng.scheduler.kv.hit_tokens > 0  # the same prompt unscored does use them


@pytest.mark.slow
def test_smollm2_shares_a_function_s_system_prompt(smol):
    """A function's requests share its system prompt: the second and third find its blocks
    cached, and answer exactly as with caching off."""
    system = "You are a careful assistant for a travel agency. " * 6
    questions = ["What is the capital of France?", "Name a river in Germany.", "Where is Lisbon?"]
    outs = {}
    for caching in (True, False):
        eng = LLMEngine(smol, EngineConfig(block_size=16, prefix_caching=caching))
        got = {}
        for i, q in enumerate(questions):
            ids = eng.encode_prompt(eng.render_chat([{"role": "user", "content": q}], system_prompt=system))
            got.update(run_all(eng, {0: [(f"q{i}", ids, GREEDY)]}))
        outs[caching] = got
        if caching:
            shared = len(eng.encode_prompt(eng.render_chat([{"role": "system", "content": system}])))
            assert eng.scheduler.kv.hit_tokens >= 2 * (shared // 16 - 1) * 16
    assert outs[True] == outs[False]
