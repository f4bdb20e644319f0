import json
from pathlib import Path

import pytest

from runtime.core.estimator import LatencyEstimator, LatencyProfile, interp

PROFILE = LatencyProfile.from_tables(
    prefill=[[128, 100], [512, 400]],
    decode=[(512, [[1, 50], [16, 100]]), (1024, [[1, 70], [16, 140]])],
)


@pytest.mark.parametrize("x,expected", [(64, 100), (128, 100), (320, 250), (512, 400), (1024, 800)])
def test_interp_linear_flat_below_proportional_above(x, expected):
    assert interp(PROFILE.prefill_ms, x) == pytest.approx(expected)


@pytest.mark.parametrize(
    "ctx,batch,ms",
    [
        (512, 1, 50), (1024, 16, 140),
        (768, 1, 60),  # halfway between context rows
        (768, 16, 120),
        (512, 8.5, 75),  # halfway between batch points
        (256, 1, 50),  # below the first row: first row
        (2048, 1, 140),  # past the last row: proportional in context
        (512, 32, 200),  # past the last batch: proportional in batch
    ],
)
def test_decode_bilinear(ctx, batch, ms):
    assert PROFILE.decode_s(ctx, batch) == pytest.approx(ms / 1e3)


def test_safety_factor_scales_everything():
    p = LatencyProfile.from_tables([[128, 100]], [(512, [[1, 50]])], safety=1.1)
    assert p.prefill_s(128) == pytest.approx(0.11)
    assert p.decode_s(512, 1) == pytest.approx(0.055)


def test_corrections_keep_the_safety_factor_on_top_of_what_is_observed():
    est = LatencyEstimator(LatencyProfile.from_tables([[128, 100]], [(512, [[1, 50]])], safety=1.1), alpha=0.5)
    for _ in range(30):
        est.observe_decode(512, 1, 0.08)
        est.observe_prefill(128, 0.09)
    assert est.decode_s(512, 1) == pytest.approx(0.088, rel=1e-3)
    assert est.prefill_s(128) == pytest.approx(0.099, rel=1e-3)


def test_correction_moves_toward_observations_and_is_clamped():
    est = LatencyEstimator(PROFILE, alpha=0.5)
    for _ in range(20):
        est.observe_decode(512, 1, 0.1)  # twice the profile
    assert est.decode_s(512, 1) == pytest.approx(0.1, rel=0.01)
    assert est.prefill_s(128) == pytest.approx(0.1)  # prefill factor untouched
    for _ in range(50):
        est.observe_prefill(128, 10.0)  # 100x: clamped at 4x
    assert est.prefill_s(128) == pytest.approx(0.4)


SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "profiles" / "slinfer_published.json"


@pytest.mark.skipif(not SHARED.exists(), reason="../shared/data/profiles not present (fresh clone without shared/)")
def test_reads_the_published_profile():
    data = json.loads(SHARED.read_text())
    cpu = LatencyProfile.from_published(data, "llama-2-7b", "cpu")
    gpu = LatencyProfile.from_published(data, "llama-2-7b", "gpu")
    assert cpu.safety == 1.1 and gpu.safety == 1.05
    assert cpu.prefill_s(512) == pytest.approx(0.285 * 1.1)
    assert gpu.decode_s(512, 1) == pytest.approx(0.014 * 1.05)
    with pytest.raises(KeyError, match="available"):
        LatencyProfile.from_published(data, "nope", "cpu")
