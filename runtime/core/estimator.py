"""Per-iteration latency estimates for one (model, device): prefill by prompt length, decode by
(context, batch). Tables come from a short profile at load time or from a published profile
(../shared/data/profiles/slinfer_published.json), so the simulator uses the same code.

Interpolation is linear in each axis (bilinear for decode); past the last point it extrapolates
proportionally, below the first point it holds the first value. A safety factor covers the
profile's noise, and observed step times keep correcting the estimate (EWMA of observed/predicted).
"""

from __future__ import annotations

import bisect
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Curve = tuple[tuple[int, float], ...]  # sorted (x, ms)
_first = operator.itemgetter(0)


def _curve(points: Sequence[Sequence[float]]) -> Curve:
    pts = tuple(sorted((int(p[0]), float(p[1])) for p in points))
    if not pts:
        raise ValueError("a latency curve needs at least one point")
    return pts


def interp(curve: Curve, x: float) -> float:
    """Linear between points, proportional past the last, flat below the first."""
    if x <= curve[0][0]:
        return curve[0][1]
    if x >= curve[-1][0]:
        return curve[-1][1] * x / curve[-1][0]
    i = bisect.bisect_right(curve, x, key=_first)  # no list of xs per call: this runs per replay step
    (x0, y0), (x1, y1) = curve[i - 1], curve[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


@dataclass(frozen=True)
class LatencyProfile:
    prefill_ms: Curve  # (prompt tokens, ms for the whole prefill)
    decode_ms: tuple[tuple[int, Curve], ...]  # (context tokens, (batch, ms per step))
    safety: float = 1.0

    def __post_init__(self) -> None:
        if not self.decode_ms:
            raise ValueError("a latency profile needs at least one decode row")
        if self.safety <= 0:
            raise ValueError(f"safety must be > 0, got {self.safety}")

    @classmethod
    def from_tables(cls, prefill: Sequence[Sequence[float]], decode: Sequence[tuple[int, Sequence[Sequence[float]]]],
                    safety: float = 1.0) -> LatencyProfile:
        rows = tuple(sorted((int(c), _curve(pts)) for c, pts in decode))
        return cls(_curve(prefill), rows, safety)

    @classmethod
    def from_published(cls, data: Mapping[str, Any], model: str, device: str,
                       safety: float | None = None) -> LatencyProfile:
        """Read one (model, device) entry of slinfer_published.json. Default safety as the
        authors: 1.05 on GPU, 1.1 on CPU."""
        models = data.get("models", {})
        if model not in models:
            raise KeyError(f"model {model!r} not in profile; available: {', '.join(sorted(models))}")
        profiles = models[model]["profiles"]
        if device not in profiles:
            raise KeyError(f"device {device!r} not profiled for {model}; available: {', '.join(sorted(profiles))}")
        p = profiles[device]
        if safety is None:
            safety = 1.05 if p.get("device") == "gpu" else 1.1
        return cls.from_tables(p["prefill"], [(c, pts) for c, pts in p["decode"]], safety)

    def prefill_s(self, tokens: int) -> float:
        return interp(self.prefill_ms, max(1, tokens)) * self.safety / 1e3

    def decode_s(self, context: float, batch: int) -> float:
        if batch <= 0:
            return 0.0
        rows = self.decode_ms
        first, last = rows[0][0], rows[-1][0]
        if context <= first or len(rows) == 1:
            ms = interp(rows[0][1], batch)
            if len(rows) == 1 and context > first:
                ms *= context / first
        elif context >= last:
            ms = interp(rows[-1][1], batch) * context / last
        else:
            i = bisect.bisect_right(rows, context, key=_first)
            (c0, r0), (c1, r1) = rows[i - 1], rows[i]
            y0, y1 = interp(r0, batch), interp(r1, batch)
            ms = y0 + (y1 - y0) * (context - c0) / (c1 - c0)
        return ms * self.safety / 1e3


class LatencyEstimator:
    """A profile plus online correction from observed step times."""

    def __init__(self, profile: LatencyProfile, alpha: float = 0.2, clamp: tuple[float, float] = (0.5, 4.0)):
        self.profile = profile
        self.alpha = alpha
        self.clamp = clamp
        self.prefill_factor = 1.0
        self.decode_factor = 1.0

    def prefill_s(self, tokens: int) -> float:
        return self.profile.prefill_s(tokens) * self.prefill_factor

    def decode_s(self, context: float, batch: int) -> float:
        return self.profile.decode_s(context, batch) * self.decode_factor

    def _update(self, factor: float, predicted_s: float, observed_s: float) -> float:
        if predicted_s <= 0 or observed_s <= 0:
            return factor
        # What the factor would have to be for the estimate to be the observation times the
        # safety factor: the correction removes the profile's bias, the safety stays on top (a
        # correction toward the bare observation would erase it, and half the steps would then
        # run longer than planned).
        ratio = observed_s / predicted_s * factor * self.profile.safety
        lo, hi = self.clamp
        return min(hi, max(lo, (1 - self.alpha) * factor + self.alpha * ratio))

    def observe_prefill(self, tokens: int, observed_s: float) -> None:
        self.prefill_factor = self._update(self.prefill_factor, self.prefill_s(tokens), observed_s)

    def observe_decode(self, context: float, batch: int, observed_s: float) -> None:
        self.decode_factor = self._update(self.decode_factor, self.decode_s(context, batch), observed_s)
