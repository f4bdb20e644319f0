"""The device thread's edge: requests reach the DeviceLoop between grants, stamped when received."""

from __future__ import annotations

import asyncio
import time

from functions import SLO, FunctionSpec
from runtime.core.arbiter import DeviceKind
from runtime.core.estimator import LatencyEstimator, LatencyProfile
from runtime.core.request import SamplingParams
from runtime.device import DeviceLoop, Instance
from runtime.device_thread import AsyncDevice
from runtime.engine.engine import EngineConfig, LLMEngine
from runtime.models.loader import load_model

FLAT = LatencyProfile.from_tables([[1, 1], [1000, 100]], [(1, [[1, 5], [64, 50]])])


def test_a_request_s_deadline_counts_from_receipt_not_from_when_the_device_got_to_it():
    # The device thread is busy for 0.3 s (one long step, here a blocking call) when a request
    # arrives. Its TTFT deadline must count from its arrival: the wait for the step is not free.
    tiny = load_model("random:llama-tiny?seed=0")
    dev = DeviceLoop(DeviceKind.CPU)
    spec = FunctionSpec(name="a", model=tiny.ref, slo=SLO(ttft_base_s=5.0, tpot_s=5.0))
    dev.add_instance(Instance("a", spec, LLMEngine(tiny, EngineConfig(block_size=16)), LatencyEstimator(FLAT)))
    adev = AsyncDevice(dev)

    async def run() -> tuple[float, float]:
        adev.start(asyncio.get_running_loop())
        busy = asyncio.create_task(adev.call(lambda d: time.sleep(0.3)))
        await asyncio.sleep(0.05)  # the device thread is now inside the blocking call
        sent = time.monotonic()
        params = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
        gen = adev.generate("a", adev.new_id("r"), [5, 6, 7, 8], params)
        first = await gen.__anext__()  # admitted and prefilled after the blocking call
        await busy
        arrival = await adev.call(lambda d: d.instances["a"].engine.scheduler.running[0].arrival_s)
        await gen.aclose()
        adev.stop()  # before the event loop closes: the thread delivers to it until then
        assert first.rid is not None
        return sent, arrival

    sent, arrival = asyncio.run(run())
    assert sent <= arrival < sent + 0.1  # stamped on receipt; the device reached it ~0.25 s later


def test_a_prompt_handed_back_by_admission_ends_its_stream_with_a_continuation():
    # 1.5 ms per prompt token by the profile: a waiting 600-token prompt (0.9 s, due 1.11 s after
    # receipt) gives way to a 200-token one (0.3 s, due 0.475 s) that would otherwise make it late.
    # The long one's caller gets finish_reason "preempted" with what is needed to go elsewhere.
    tiny = load_model("random:llama-tiny?seed=0")
    flat = [[1, 5], [64, 50]]
    slow = LatencyProfile.from_tables([[1, 1.5], [1000, 1500]], [(1, flat), (4096, flat)])
    dev = DeviceLoop(DeviceKind.CPU)
    for name in ("a", "b"):
        spec = FunctionSpec(name=name, model=tiny.ref, slo=SLO())
        eng = LLMEngine(tiny, EngineConfig(block_size=16, max_model_len=1024))
        dev.add_instance(Instance(name, spec, eng, LatencyEstimator(slow)))
    adev = AsyncDevice(dev)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    long_prompt = [3 + i % 300 for i in range(600)]

    async def run():
        adev.start(asyncio.get_running_loop())
        hold = asyncio.create_task(adev.call(lambda d: time.sleep(0.05)))  # both arrive while it waits
        await asyncio.sleep(0.01)
        long_gen = adev.generate("a", adev.new_id("long"), long_prompt, params, admission=False)
        short_gen = adev.generate("b", adev.new_id("short"), list(range(5, 205)), params)
        long_first = asyncio.create_task(long_gen.__anext__())
        await asyncio.sleep(0.005)  # the long one is queued first
        short_outs = [o async for o in short_gen]
        long_out = await asyncio.wait_for(long_first, 10)  # never hang if it is not delivered
        await hold
        await long_gen.aclose()
        displaced = await adev.call(lambda d: d.stats.displaced)
        adev.stop()
        return long_out, short_outs, displaced

    long_out, short_outs, displaced = asyncio.run(run())
    assert long_out.finish_reason.value == "preempted" and long_out.new_token_ids == ()
    assert list(long_out.continuation.prompt_token_ids) == long_prompt
    assert sum(len(o.new_token_ids) for o in short_outs) == 4 and short_outs[-1].finished
    assert displaced == 1
