"""Workloads: the published Azure-derived traces, and a seeded generator of the same shape.

A `Trace` is a frozen value: the functions (in trace order), their arrivals (time, function, prompt
and output lengths) sorted by (time_s, function, per-function index), the duration and where it came
from. The paper's three load levels are `trace.select_groups(2 | 4 | 8)` of the 128-function trace.
Transformations (`select_groups`, `first_functions`, `window`, `scale_lengths`, `scale_time`) return
new traces; nothing here reads a clock, the environment or anything but the one file asked for.

`load_trace(path)` reads the SLINFER authors' JSON (see ../shared/data/README.md); a fresh clone has
no ../shared, so `synthetic_trace(...)` builds a workload from a seed alone. Errors: `TraceError`
(a `ValueError`) for unusable trace files and malformed traces, naming the function index and the
problem; plain `ValueError` for bad arguments to the transformations and the generator.

Measured with this module (per-function counts: linear-interpolated quantiles over all functions;
`synthetic_trace()` with its defaults, seed 0, and the range over seeds 0-19):

                              requests  count median  p90      max      prompt mean  output mean
    azure_30min_128fn.json    9266      7.0           190.6    772      867.2        219.7
    synthetic, seed 0         9280      6.5           183.3    792      865.4        221.8
    synthetic, seeds 0-19     9274-9290 6.0-6.5       180-188  789-823  855-882      218-224
    select_groups(2 / 4):     real 2366 / 4684 (as the paper says), synthetic seed 0 2406 / 4750
    functions called once:    real 24, synthetic seeds 0-4 29-31
    prompt p10/p50/p90:       real 203 / 980 / 1416, synthetic 237 / 644 / 1771 (both max in+out 4088)
    output p10/p50/p90:       real 64 / 140 / 425, synthetic 59 / 163 / 461 (both max 1000)
    functions with >= 4 requests, by inter-arrival coefficient of variation (CV < 0.5 timer-like,
    > 1.4 bursty): real 24 timer / 16 bursty / 43 Poisson-like; synthetic seeds 0-4 19-27 / 12-17 /
    34-47. Busiest minute of one function: real 280 requests, synthetic seeds 0-4 166-395.

The published file lists functions busiest first in 16 strata of 8 near-equal functions (772-734,
196-190, 81-80, ..., then 2, 1, 1, 1), which is why `select_groups(g)` keeps about g/8 of the load.

How `synthetic_trace` builds a trace (defaults tuned to the numbers above):
- Popularity: the functions form strata of `popularity_group_size`; stratum g of G gets the
  log-weight sigma * z_g, z_g the standard-normal quantile at the stratum midpoint 1 - (g+0.5)/G,
  with sigma = `popularity_sigma` above the median and `popularity_sigma_low` below (a two-piece
  lognormal: the rarely-called tail of the real trace is flatter). Each function adds Gaussian
  jitter `popularity_jitter` to its stratum's log-weight. Expected counts split
  `total_rate_per_s * duration_s` by weight; counts are rounded stochastically and raised to
  `min_requests_per_function` (the file has no idle ones); functions are numbered busiest first,
  as in the published file.
- Arrival times, given a function's count n: Poisson (n uniform times); timer (period
  duration/n with a random phase and Gaussian jitter, only where the period is at least
  `timer_min_period_s`); or bursty, a two-state on/off Markov-modulated Poisson process conditioned
  on its count: exponential on/off periods, a `burst_share` of requests uniform over the on periods
  and the rest uniform over the whole trace.
- Lengths: correlated lognormals (log-correlation 0.3; measured 0.32) whose raw means are set so
  that, after clamping outputs to `max_output_tokens` and prompt+output to `max_total_tokens`
  (prompt shrunk first), the means land on 867 / 220. The real prompt distribution is left-skewed
  (median 980 > mean 867), which a lognormal does not reproduce; means and bounds match.
"""

from __future__ import annotations

import bisect
import json
import math
import os
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from statistics import NormalDist

PUBLISHED_TRACES_DIR = "../shared/data/traces"
_REQUIRED_KEYS = ("HashFunction", "rpm_list", "total_cnt", "timestamps", "input", "output")


class TraceError(ValueError):
    """A trace (file or value) that cannot be used; the message says which function and why."""


@dataclass(frozen=True)
class Arrival:
    time_s: float
    function: str
    prompt_tokens: int
    output_tokens: int


def function_name(index: int) -> str:
    """The name of the index-th function of a trace: fn-000, fn-001, ..."""
    return f"fn-{index:03d}"


def _order(arrivals: Iterable[Arrival]) -> tuple[Arrival, ...]:
    """Sort by (time_s, function); the sort is stable, so per-function index breaks the last ties."""
    return tuple(sorted(arrivals, key=lambda a: (a.time_s, a.function)))


@dataclass(frozen=True)
class Trace:
    """Functions in trace order and their arrivals, sorted by (time_s, function, index).

    `hashes` holds the Azure HashFunction of each function (aligned with `functions`) for loaded
    traces and is empty for synthetic ones."""

    functions: tuple[str, ...]
    arrivals: tuple[Arrival, ...]
    duration_s: float
    source: str
    hashes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not (math.isfinite(self.duration_s) and self.duration_s > 0):
            raise TraceError(f"trace duration must be a positive number of seconds, got {self.duration_s}")
        if len(set(self.functions)) != len(self.functions):
            dupes = sorted(f for f, c in Counter(self.functions).items() if c > 1)
            raise TraceError(f"function names must be unique; repeated: {', '.join(dupes)}")
        if self.hashes and len(self.hashes) != len(self.functions):
            raise TraceError(f"{len(self.hashes)} hashes for {len(self.functions)} functions; "
                             "give one per function or none")
        known = set(self.functions)
        previous: tuple[float, str] | None = None
        for i, a in enumerate(self.arrivals):
            if a.function not in known:
                raise TraceError(f"arrival {i} names function {a.function!r}, which is not in the trace")
            if not 0.0 <= a.time_s <= self.duration_s:
                raise TraceError(f"arrival {i} ({a.function}) at {a.time_s} s is outside "
                                 f"[0, {self.duration_s}] s")
            if a.prompt_tokens < 0 or a.output_tokens < 0:
                raise TraceError(f"arrival {i} ({a.function}) has negative token counts "
                                 f"({a.prompt_tokens} prompt, {a.output_tokens} output)")
            key = (a.time_s, a.function)
            if previous is not None and key < previous:
                raise TraceError(f"arrivals must be sorted by (time_s, function); arrival {i} "
                                 f"({a.function} at {a.time_s} s) comes after {previous}")
            previous = key

    def _keep(self, indices: Iterable[int]) -> Trace:
        keep = list(indices)
        names = tuple(self.functions[i] for i in keep)
        kept = set(names)
        return Trace(functions=names, arrivals=tuple(a for a in self.arrivals if a.function in kept),
                     duration_s=self.duration_s, source=self.source,
                     hashes=tuple(self.hashes[i] for i in keep) if self.hashes else ())

    def select_groups(self, g: int, group_size: int = 8) -> Trace:
        """Keep the first g functions of each consecutive group of group_size (the paper's load
        levels: g = 2, 4, 8 of the 128-function trace give 32, 64, 128 functions)."""
        if group_size < 1 or not 1 <= g <= group_size:
            raise ValueError(f"select_groups needs 1 <= g <= group_size, got g={g}, group_size={group_size}")
        return self._keep(i for i in range(len(self.functions)) if i % group_size < g)

    def first_functions(self, k: int) -> Trace:
        """Keep the first k functions (in trace order) and their arrivals."""
        if not 0 <= k <= len(self.functions):
            raise ValueError(f"first_functions({k}): the trace has {len(self.functions)} functions")
        return self._keep(range(k))

    def busiest(self, k: int) -> Trace:
        """Keep the k functions with the most arrivals (ties: trace order), in trace order. For
        analysis: what the busiest functions alone can meet on a cluster bounds what they meet
        beside the others."""
        if not 0 <= k <= len(self.functions):
            raise ValueError(f"busiest({k}): the trace has {len(self.functions)} functions")
        counts = Counter(a.function for a in self.arrivals)
        ranked = sorted(range(len(self.functions)), key=lambda i: (-counts[self.functions[i]], i))
        return self._keep(sorted(ranked[:k]))

    def window(self, start_s: float, end_s: float) -> Trace:
        """Arrivals with start_s <= time_s < end_s, shifted so that start_s becomes 0."""
        if not 0.0 <= start_s < end_s <= self.duration_s:
            raise ValueError(f"window({start_s}, {end_s}) must satisfy 0 <= start < end <= "
                             f"{self.duration_s} (the trace duration)")
        shifted = (replace(a, time_s=a.time_s - start_s) for a in self.arrivals if start_s <= a.time_s < end_s)
        return replace(self, arrivals=_order(shifted), duration_s=end_s - start_s)

    def scale_lengths(self, factor: float, min_prompt: int = 1, min_output: int = 1,
                      max_total: int | None = None) -> Trace:
        """Multiply prompt and output lengths by factor (rounded half to even), raise them to the
        minimums, and if max_total is given shrink prompt+output to it, the prompt first."""
        if not (math.isfinite(factor) and factor > 0):
            raise ValueError(f"scale_lengths factor must be a positive number, got {factor}")
        if min_prompt < 0 or min_output < 0:
            raise ValueError(f"minimum lengths must be non-negative, got {min_prompt} and {min_output}")
        if max_total is not None and max_total < min_prompt + min_output:
            raise ValueError(f"max_total={max_total} is below min_prompt + min_output = "
                             f"{min_prompt + min_output}")

        def scaled(a: Arrival) -> Arrival:
            prompt = max(min_prompt, round(a.prompt_tokens * factor))
            output = max(min_output, round(a.output_tokens * factor))
            if max_total is not None and prompt + output > max_total:
                prompt = max(min_prompt, max_total - output)
                output = max_total - prompt
            return replace(a, prompt_tokens=prompt, output_tokens=output)

        return replace(self, arrivals=tuple(scaled(a) for a in self.arrivals))

    def scale_time(self, factor: float) -> Trace:
        """Multiply every arrival time and the duration by factor (0.5: the same requests in half
        the time, twice the rate)."""
        if not (math.isfinite(factor) and factor > 0):
            raise ValueError(f"scale_time factor must be a positive number, got {factor}")
        scaled = (replace(a, time_s=a.time_s * factor) for a in self.arrivals)
        return replace(self, arrivals=_order(scaled), duration_s=self.duration_s * factor)

    def requests_per_function(self) -> dict[str, int]:
        """Request count of every function, in trace order (zero for functions with none)."""
        counts = Counter(a.function for a in self.arrivals)
        return {f: counts.get(f, 0) for f in self.functions}

    def stats(self) -> dict[str, float]:
        """Requests, functions, duration, per-function count median/p90/max (linear-interpolated
        quantiles over all functions, idle ones included) and mean prompt/output tokens."""
        per_function = sorted(self.requests_per_function().values())
        n = len(self.arrivals)
        return {
            "requests": float(n),
            "functions": float(len(self.functions)),
            "duration_s": self.duration_s,
            "count_median": _quantile(per_function, 0.5),
            "count_p90": _quantile(per_function, 0.9),
            "count_max": float(per_function[-1]) if per_function else 0.0,
            "prompt_mean": sum(a.prompt_tokens for a in self.arrivals) / n if n else 0.0,
            "output_mean": sum(a.output_tokens for a in self.arrivals) / n if n else 0.0,
        }


def _quantile(sorted_values: Sequence[int], q: float) -> float:
    if not sorted_values:
        return 0.0
    position = q * (len(sorted_values) - 1)
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


# ---------------------------------------------------------------------------------------- loading


def load_trace(path: str | os.PathLike[str]) -> Trace:
    """Read a trace in the SLINFER authors' JSON format (one object per function with HashFunction,
    rpm_list, total_cnt and aligned timestamps/input/output lists). Functions are named fn-000,
    fn-001, ... in file order; the duration is 60 s per rpm_list entry."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TraceError(
            f"trace file {file} not found; the published Azure traces live in {PUBLISHED_TRACES_DIR} "
            "(next to the project, not part of a clone), and synthetic_trace() builds a seeded "
            "workload of the same shape without them") from None
    except OSError as e:
        raise TraceError(f"cannot read trace file {file}: {e}") from e
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise TraceError(f"{file} is not valid JSON: {e}") from e
    if not isinstance(raw, list) or not raw:
        raise TraceError(f"{file}: expected a non-empty JSON list with one object per function")

    hashes: list[str] = []
    arrivals: list[Arrival] = []
    minutes = 0
    for index, entry in enumerate(raw):
        hash_function, function_arrivals, function_minutes = _parse_function(file, index, entry, minutes)
        minutes = minutes or function_minutes
        hashes.append(hash_function)
        arrivals.extend(function_arrivals)
    return Trace(functions=tuple(function_name(i) for i in range(len(raw))), arrivals=_order(arrivals),
                 duration_s=60.0 * minutes, source=str(file), hashes=tuple(hashes))


def _parse_function(file: Path, index: int, entry: object, minutes: int) -> tuple[str, list[Arrival], int]:
    """One function's object: its hash, its arrivals and its number of minutes. `minutes` is the
    length every rpm_list must have (0 for the first function, which sets it)."""
    name = function_name(index)
    where = f"{file}: function {index} ({name})"
    if not isinstance(entry, dict):
        raise TraceError(f"{where}: expected an object, got {type(entry).__name__}")
    missing = [k for k in _REQUIRED_KEYS if k not in entry]
    if missing:
        raise TraceError(f"{where}: missing {', '.join(missing)}")
    if not isinstance(entry["HashFunction"], str):
        raise TraceError(f"{where}: HashFunction must be a string")
    rpm = _numbers(entry["rpm_list"], "rpm_list", integral=True, where=where)
    times = _numbers(entry["timestamps"], "timestamps", integral=False, where=where)
    prompts = _numbers(entry["input"], "input", integral=True, where=where)
    outputs = _numbers(entry["output"], "output", integral=True, where=where)
    total = entry["total_cnt"]
    if not rpm:
        raise TraceError(f"{where}: rpm_list is empty (it gives the trace duration, one entry per minute)")
    if minutes and len(rpm) != minutes:
        raise TraceError(f"{where}: rpm_list has {len(rpm)} minutes but function 0 has {minutes}")
    if not len(times) == len(prompts) == len(outputs):
        raise TraceError(f"{where}: timestamps, input and output must be aligned, got {len(times)}, "
                         f"{len(prompts)} and {len(outputs)} entries")
    if isinstance(total, bool) or not isinstance(total, int) or total != len(times) or total != sum(rpm):
        raise TraceError(f"{where}: total_cnt={total!r} disagrees with {len(times)} timestamps and "
                         f"rpm_list sum {sum(rpm):g}")
    late = [t for t in times if t > 60.0 * len(rpm)]
    if late:
        raise TraceError(f"{where}: timestamp {late[0]:g} s is past the end of the trace ({len(rpm)} minutes)")
    arrivals = [Arrival(t, name, int(p), int(o)) for t, p, o in zip(times, prompts, outputs, strict=True)]
    return entry["HashFunction"], arrivals, len(rpm)


def _numbers(value: object, key: str, *, integral: bool, where: str) -> list[float]:
    """A JSON list of non-negative finite numbers (integers where integral)."""
    if not isinstance(value, list):
        raise TraceError(f"{where}: {key} must be a list, got {type(value).__name__}")
    for k, x in enumerate(value):
        if isinstance(x, bool) or not isinstance(x, (int, float)) or (integral and not isinstance(x, int)):
            raise TraceError(f"{where}: {key}[{k}] is {x!r}; expected {'an integer' if integral else 'a number'}")
        if not math.isfinite(x) or x < 0:
            raise TraceError(f"{where}: {key}[{k}] is {x!r}; values must be non-negative")
    return [float(x) for x in value]


# ------------------------------------------------------------------------------------- synthetic


def synthetic_trace(
    num_functions: int = 128,
    duration_s: float = 1800.0,
    seed: int = 0,
    total_rate_per_s: float = 9266 / 1800,
    *,
    popularity_sigma: float = 2.6,
    popularity_group_size: int = 8,
    popularity_sigma_low: float = 2.0,
    popularity_jitter: float = 0.03,
    min_requests_per_function: int = 1,
    bursty_fraction: float = 0.25,
    timer_fraction: float = 0.5,
    timer_min_period_s: float = 60.0,
    timer_jitter: float = 0.05,
    burst_on_s: float = 60.0,
    burst_off_s: float = 600.0,
    burst_share: float = 0.8,
    prompt_mean: float = 887.0,
    prompt_sigma: float = 0.8,
    output_mean: float = 224.0,
    output_sigma: float = 0.8,
    length_correlation: float = 0.3,
    max_output_tokens: int = 1000,
    max_total_tokens: int = 4088,
) -> Trace:
    """A seeded workload shaped like the Azure trace (see the module docstring for the model).

    Defaults reproduce azure_30min_128fn.json's shape: 128 functions, 30 min, 5.15 req/s in all.
    popularity_sigma / popularity_sigma_low: log-sd of the popularity above / below the median (a
    two-piece lognormal: the real trace's rarely-called tail is flatter); popularity_group_size: functions per
    popularity stratum (1: one stratum per function, a heavier top); popularity_jitter: log-sd of
    each function's weight around its stratum's.
    min_requests_per_function: every function is called at least this often.
    bursty_fraction / timer_fraction: share of functions with on/off bursts / periodic calls (timers
    only where the period duration/n >= timer_min_period_s; timer_jitter is the sd as a fraction of
    the period). burst_on_s / burst_off_s: mean on and off periods; burst_share: share of a bursty
    function's requests that fall in its on periods.
    prompt_mean/_sigma, output_mean/_sigma: raw lognormal means and log-sds (before clamping);
    length_correlation: correlation of the two log-lengths; max_output_tokens, max_total_tokens: clamps.
    The same arguments always give the same trace."""
    checks = [
        (num_functions >= 1, f"num_functions must be >= 1, got {num_functions}"),
        (math.isfinite(duration_s) and duration_s > 0, f"duration_s must be positive, got {duration_s}"),
        (math.isfinite(total_rate_per_s) and total_rate_per_s >= 0,
         f"total_rate_per_s must be >= 0, got {total_rate_per_s}"),
        (min(popularity_sigma, popularity_sigma_low, popularity_jitter) >= 0 and popularity_group_size >= 1,
         "popularity sigmas and jitter must be >= 0 and popularity_group_size >= 1"),
        (min_requests_per_function >= 0, f"min_requests_per_function must be >= 0, got {min_requests_per_function}"),
        (min(bursty_fraction, timer_fraction) >= 0 and bursty_fraction + timer_fraction <= 1,
         f"bursty_fraction and timer_fraction must be >= 0 and sum to <= 1, got {bursty_fraction} "
         f"and {timer_fraction}"),
        (min(burst_on_s, burst_off_s) > 0 and 0 <= burst_share <= 1 and timer_jitter >= 0,
         "burst_on_s and burst_off_s must be positive, burst_share in [0, 1] and timer_jitter >= 0"),
        (min(prompt_mean, output_mean) > 0 and min(prompt_sigma, output_sigma) >= 0,
         "length means must be positive and their sigmas >= 0"),
        (-1 < length_correlation < 1, f"length_correlation must be in (-1, 1), got {length_correlation}"),
        (1 <= max_output_tokens < max_total_tokens, "need 1 <= max_output_tokens < max_total_tokens"),
    ]
    for ok, problem in checks:
        if not ok:
            raise ValueError(f"synthetic_trace: {problem}")
    rng = random.Random(seed)
    strata = -(-num_functions // popularity_group_size)
    stratum_z = [NormalDist().inv_cdf(1.0 - (g + 0.5) / strata) for g in range(strata)]
    stratum_log_weight = [z * (popularity_sigma if z > 0 else popularity_sigma_low) for z in stratum_z]
    weights = [math.exp(stratum_log_weight[i // popularity_group_size] + rng.gauss(0.0, popularity_jitter))
               for i in range(num_functions)]
    expected_total = total_rate_per_s * duration_s
    weight_sum = sum(weights)

    prompt_mu = math.log(prompt_mean) - prompt_sigma**2 / 2
    output_mu = math.log(output_mean) - output_sigma**2 / 2
    spread = math.sqrt(1.0 - length_correlation**2)
    expected = [expected_total * w / weight_sum for w in weights]
    counts = sorted((max(min_requests_per_function, math.floor(e) + (rng.random() < e % 1.0)) for e in expected),
                    reverse=True)
    arrivals: list[Arrival] = []
    for index, count in enumerate(counts):
        kind_draw = rng.random()
        frng = random.Random(rng.getrandbits(64))
        if kind_draw < bursty_fraction:
            times = _bursty_times(frng, count, duration_s, burst_on_s, burst_off_s, burst_share)
        elif (kind_draw < bursty_fraction + timer_fraction and count >= 2
              and duration_s / count >= timer_min_period_s):
            times = _timer_times(frng, count, duration_s, timer_jitter)
        else:
            times = [frng.random() * duration_s for _ in range(count)]
        name = function_name(index)
        for t in sorted(times):
            z_prompt = frng.gauss(0.0, 1.0)
            z_output = length_correlation * z_prompt + spread * frng.gauss(0.0, 1.0)
            output = min(max_output_tokens, max(1, round(math.exp(output_mu + output_sigma * z_output))))
            prompt = min(max_total_tokens - output, max(1, round(math.exp(prompt_mu + prompt_sigma * z_prompt))))
            arrivals.append(Arrival(t, name, prompt, output))
    source = (f"synthetic(seed={seed}, functions={num_functions}, duration_s={duration_s:g}, "
              f"rate_per_s={total_rate_per_s:g})")
    return Trace(functions=tuple(function_name(i) for i in range(num_functions)), arrivals=_order(arrivals),
                 duration_s=duration_s, source=source)


def _clip(t: float, duration_s: float) -> float:
    return min(max(t, 0.0), math.nextafter(duration_s, 0.0))


def _timer_times(rng: random.Random, count: int, duration_s: float, jitter: float) -> list[float]:
    """Periodic calls: one every duration/count seconds from a random phase, with Gaussian jitter."""
    period = duration_s / count
    phase = rng.random() * period
    return [_clip(phase + k * period + rng.gauss(0.0, jitter * period), duration_s) for k in range(count)]


def _bursty_times(rng: random.Random, count: int, duration_s: float, on_s: float, off_s: float,
                  burst_share: float) -> list[float]:
    """An on/off MMPP conditioned on its count: exponential on and off periods (starting in the
    stationary state); each request lands uniformly in the on periods with probability burst_share,
    else uniformly in the whole trace."""
    bursts: list[tuple[float, float]] = []
    t, on = 0.0, rng.random() < on_s / (on_s + off_s)
    while t < duration_s:
        length = rng.expovariate(1.0 / (on_s if on else off_s))
        if on:
            bursts.append((t, min(t + length, duration_s)))
        t, on = t + length, not on
    if not bursts:  # a trace shorter than one off period: give the function one burst anyway
        start = rng.random() * duration_s
        bursts.append((start, min(start + rng.expovariate(1.0 / on_s), duration_s)))
    ends = []
    total_on = 0.0
    for start, end in bursts:
        total_on += end - start
        ends.append(total_on)
    times = []
    for _ in range(count):
        if rng.random() < burst_share:
            x = rng.random() * total_on
            k = min(bisect.bisect_right(ends, x), len(bursts) - 1)
            times.append(_clip(bursts[k][1] - (ends[k] - x), duration_s))
        else:
            times.append(rng.random() * duration_s)
    return times
