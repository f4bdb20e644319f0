"""Several real (tiny random) model instances on one device loop, arbitrated by EDF."""

from __future__ import annotations

import pytest

from functions import SLO, FunctionSpec
from runtime.core.admission import RefusalReason
from runtime.core.arbiter import DeviceKind
from runtime.core.estimator import LatencyEstimator, LatencyProfile
from runtime.core.ids import RequestId
from runtime.core.request import SamplingParams
from runtime.device import DeviceLoop, Instance
from runtime.engine.engine import EngineConfig, LLMEngine
from runtime.engine.profiler import profile_engine
from runtime.models.loader import load_model

FLAT = LatencyProfile.from_tables([[1, 1], [1000, 100]], [(1, [[1, 5], [64, 50]])])


@pytest.fixture(scope="module")
def tiny():
    return load_model("random:llama-tiny?seed=0")


def make_instance(loaded, iid, tpot_s=0.25, ttft_base_s=0.5, profile=FLAT, **cfg):
    spec = FunctionSpec(name=iid, model=loaded.ref, slo=SLO(ttft_base_s=ttft_base_s, tpot_s=tpot_s))
    eng = LLMEngine(loaded, EngineConfig(block_size=16, **cfg))
    return Instance(iid, spec, eng, LatencyEstimator(profile))


def test_edf_order_between_instances_with_different_deadlines(tiny):
    dev = DeviceLoop(DeviceKind.CPU)
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
    # First tokens both due at 0.5: a wins the tie by id, then b's (0.5) precedes a's second (0.55).
    # a's next deadlines 0.55 .. 1.5 (20 tokens) all come before b's second (1.5; tie -> a), then b.
    assert grants[:23] == ["a", "b"] + ["a"] * 20 + ["b"]
    assert dev.stats.decisions == 24 and dev.stats.mean_us > 0


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
    d = dev.admit("a", 10, now=0.0)
    assert not d.admitted and d.reason is RefusalReason.COMPUTE
    dev2 = DeviceLoop()
    dev2.add_instance(make_instance(tiny, "a", max_model_len=64))
    assert dev2.admit("a", 64, now=0.0).reason is RefusalReason.CONTEXT
    assert dev2.admit("a", 20, now=0.0).admitted


def test_profile_measures_real_steps_and_leaves_no_kv(tiny):
    inst = make_instance(tiny, "p")
    prof = profile_engine(inst.engine, prefill_lengths=(16, 128), decode_points=((32, (1, 4)),), decode_steps=2)
    assert [n for n, _ in prof.prefill_ms] == [16, 128]
    assert all(ms > 0 for _, ms in prof.prefill_ms)
    assert [b for b, _ in prof.decode_ms[0][1]] == [1, 4]
    assert inst.engine.kv_blocks_used == 0 and not inst.engine.has_work
