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
