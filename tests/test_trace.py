"""Workloads: the published Azure trace, its validation, the seeded generator, and the transformations."""

from __future__ import annotations

import copy
import json
import statistics
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from autoscaler.sim.trace import Arrival, Trace, TraceError, load_trace, synthetic_trace

TRACES = Path(__file__).resolve().parents[2] / "shared" / "data" / "traces"
AZURE = TRACES / "azure_30min_128fn.json"


@pytest.fixture(scope="module")
def azure() -> Trace:
    if not TRACES.is_dir():
        pytest.skip(f"{TRACES} is absent: the published traces live next to the project, not in it")
    return load_trace(AZURE)


def make_trace(rows: list[tuple[float, str, int, int]], functions: tuple[str, ...] = ("a", "b"),
               duration_s: float = 10.0) -> Trace:
    arrivals = tuple(Arrival(t, f, p, o) for t, f, p, o in sorted(rows, key=lambda r: (r[0], r[1])))
    return Trace(functions=functions, arrivals=arrivals, duration_s=duration_s, source="hand-built",
                 hashes=tuple(f"h-{f}" for f in functions))


def per_function_times(trace: Trace) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {f: [] for f in trace.functions}
    for a in trace.arrivals:
        times[a.function].append(a.time_s)
    return times


def gap_cv(times: list[float]) -> float:
    """Coefficient of variation of inter-arrival gaps (timer ~0, Poisson ~1, bursty > 1)."""
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    return statistics.pstdev(gaps) / statistics.mean(gaps)


# ------------------------------------------------------------------------------ the published trace


@pytest.mark.parametrize(("groups", "functions", "requests"), [(2, 32, 2366), (4, 64, 4684), (8, 128, 9266)])
def test_paper_load_levels(azure: Trace, groups: int, functions: int, requests: int) -> None:
    level = azure.select_groups(groups)
    assert (len(level.functions), len(level.arrivals)) == (functions, requests)
    assert level.functions[:groups + 1] == tuple(f"fn-{i:03d}" for i in [*range(groups), 8])


def test_azure_trace_shape(azure: Trace) -> None:
    assert azure.functions == tuple(f"fn-{i:03d}" for i in range(128))
    assert len(azure.hashes) == len(set(azure.hashes)) == 128
    assert azure.duration_s == 1800.0
    stats = azure.stats()
    assert stats["count_median"] == 7.0
    assert stats["count_p90"] == pytest.approx(190.6)
    assert stats["count_max"] == 772.0
    assert stats["prompt_mean"] == pytest.approx(867.18, abs=0.01)
    assert stats["output_mean"] == pytest.approx(219.69, abs=0.01)
    assert max(a.prompt_tokens + a.output_tokens for a in azure.arrivals) == 4088
    keys = [(a.time_s, a.function) for a in azure.arrivals]
    assert keys == sorted(keys)


def test_azure_first_minute_matches_rpm_list(azure: Trace) -> None:
    raw = json.loads(AZURE.read_text())
    first_minute = azure.window(0.0, 60.0)
    assert len(first_minute.arrivals) == sum(entry["rpm_list"][0] for entry in raw)
    assert first_minute.duration_s == 60.0


# ------------------------------------------------------------------------------ malformed files


def make_entry(times: list[float], minutes: int = 2) -> dict[str, Any]:
    rpm = [sum(1 for t in times if m * 60 <= t < (m + 1) * 60) for m in range(minutes)]
    return {"HashFunction": f"hash-{len(times)}", "rpm_list": rpm, "total_cnt": len(times),
            "timestamps": times, "input": [100 + i for i in range(len(times))],
            "output": [10 + i for i in range(len(times))]}


VALID = [make_entry([1.0, 70.0]), make_entry([5.0, 6.0, 90.0]), make_entry([30.0])]


def write(tmp_path: Path, document: object) -> Path:
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(document))
    return path


def test_valid_document_loads(tmp_path: Path) -> None:
    trace = load_trace(write(tmp_path, VALID))
    assert trace.functions == ("fn-000", "fn-001", "fn-002")
    assert trace.hashes == ("hash-2", "hash-3", "hash-1")
    assert trace.duration_s == 120.0
    assert [(a.time_s, a.function) for a in trace.arrivals][:3] == [(1.0, "fn-000"), (5.0, "fn-001"),
                                                                    (6.0, "fn-001")]


def _set(key: str, value: object) -> Callable[[dict[str, Any]], object]:
    def mutate(entry: dict[str, Any]) -> object:
        entry[key] = value
        return entry
    return mutate


def _set_item(key: str, k: int, value: object) -> Callable[[dict[str, Any]], object]:
    def mutate(entry: dict[str, Any]) -> object:
        entry[key][k] = value
        return entry
    return mutate


def _drop(key: str) -> Callable[[dict[str, Any]], object]:
    def mutate(entry: dict[str, Any]) -> object:
        del entry[key]
        return entry
    return mutate


@pytest.mark.parametrize(("mutate", "problem"), [
    (_set("input", [100, 101]), "must be aligned"),
    (_set_item("timestamps", 0, -1.0), "timestamps[0] is -1.0; values must be non-negative"),
    (_set_item("output", 1, -3), "output[1] is -3; values must be non-negative"),
    (_set_item("input", 2, 1.5), "input[2] is 1.5; expected an integer"),
    (_set_item("timestamps", 1, "6"), "timestamps[1] is '6'; expected a number"),
    (_drop("output"), "missing output"),
    (_set("total_cnt", 4), "total_cnt=4 disagrees"),
    (_set("rpm_list", [2, 1, 0]), "rpm_list has 3 minutes but function 0 has 2"),
    (_set_item("timestamps", 2, 500.0), "timestamp 500 s is past the end"),
    (_set("HashFunction", 7), "HashFunction must be a string"),
    (lambda entry: [entry], "expected an object, got list"),
])
def test_malformed_function_names_index_and_problem(
        tmp_path: Path, mutate: Callable[[dict[str, Any]], object], problem: str) -> None:
    document: list[object] = [copy.deepcopy(entry) for entry in VALID]
    document[1] = mutate(copy.deepcopy(VALID[1]))
    with pytest.raises(TraceError) as caught:
        load_trace(write(tmp_path, document))
    assert "function 1 (fn-001)" in str(caught.value)
    assert problem in str(caught.value)


@pytest.mark.parametrize(("text", "problem"), [
    ("{not json", "is not valid JSON"),
    ('{"HashFunction": "x"}', "expected a non-empty JSON list"),
    ("[]", "expected a non-empty JSON list"),
])
def test_malformed_document(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(TraceError, match=problem) as caught:
        load_trace(path)
    assert str(path) in str(caught.value)


def test_missing_file_points_at_shared_traces_and_the_generator(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "azure.json"
    with pytest.raises(TraceError) as caught:
        load_trace(missing)
    message = str(caught.value)
    assert str(missing) in message
    assert "../shared/data/traces" in message
    assert "synthetic_trace" in message


# ------------------------------------------------------------------------------ synthetic traces


def test_synthetic_is_deterministic_per_seed() -> None:
    assert synthetic_trace(seed=3) == synthetic_trace(seed=3)
    assert synthetic_trace(seed=3).arrivals != synthetic_trace(seed=4).arrivals
    assert synthetic_trace(seed=3).source == "synthetic(seed=3, functions=128, duration_s=1800, rate_per_s=5.14778)"


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_synthetic_popularity_is_heavy_tailed_like_azure(seed: int) -> None:
    trace = synthetic_trace(seed=seed)
    stats = trace.stats()
    assert stats["count_max"] >= 10 * stats["count_median"]
    assert 4 <= stats["count_median"] <= 10          # Azure: 7
    assert 120 <= stats["count_p90"] <= 280          # Azure: 190.6
    assert 550 <= stats["count_max"] <= 1000         # Azure: 772
    assert 9266 <= stats["requests"] <= 9266 * 1.01  # 5.15 req/s for 30 min, plus functions raised to 1
    assert min(trace.requests_per_function().values()) == 1
    counts = list(trace.requests_per_function().values())
    assert counts == sorted(counts, reverse=True)     # busiest first, as in the published file
    assert 0.22 <= len(trace.select_groups(2).arrivals) / stats["requests"] <= 0.30  # Azure: 0.255


@pytest.mark.parametrize(("kwargs", "max_output", "max_total"), [
    ({}, 1000, 4088),
    ({"max_output_tokens": 64, "max_total_tokens": 512}, 64, 512),
])
def test_synthetic_lengths_within_bounds(kwargs: dict[str, Any], max_output: int, max_total: int) -> None:
    trace = synthetic_trace(seed=1, **kwargs)
    assert min(a.prompt_tokens for a in trace.arrivals) >= 1
    assert min(a.output_tokens for a in trace.arrivals) >= 1
    assert max(a.output_tokens for a in trace.arrivals) == max_output
    assert max(a.prompt_tokens + a.output_tokens for a in trace.arrivals) == max_total


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_synthetic_length_means_match_azure(seed: int) -> None:
    stats = synthetic_trace(seed=seed).stats()
    assert stats["prompt_mean"] == pytest.approx(867, rel=0.04)
    assert stats["output_mean"] == pytest.approx(220, rel=0.04)


def test_synthetic_has_timer_like_and_bursty_functions() -> None:
    cvs = [gap_cv(times) for times in per_function_times(synthetic_trace(seed=0)).values() if len(times) >= 4]
    assert sum(cv < 0.5 for cv in cvs) >= 5
    assert sum(cv > 1.4 for cv in cvs) >= 5


def test_synthetic_timers_and_bursts_follow_their_fractions() -> None:
    timers = synthetic_trace(seed=0, bursty_fraction=0.0, timer_fraction=1.0, timer_min_period_s=0.0)
    assert all(gap_cv(t) < 0.3 for t in per_function_times(timers).values() if len(t) >= 4)
    # Busy bursty functions put many times their mean per-minute rate into their busiest minute
    # (about 10x here); Poisson ones (at least 50/30 requests a minute) about 2x.
    for bursty_fraction, at_least, below in [(1.0, 5.0, 30.1), (0.0, 1.0, 2.5)]:
        trace = synthetic_trace(seed=0, bursty_fraction=bursty_fraction, timer_fraction=0.0, burst_share=1.0)
        busy = [t for t in per_function_times(trace).values() if len(t) >= 50]
        assert len(busy) >= 24
        peak_to_mean = [max(Counter(int(t // 60) for t in times).values()) / (len(times) / 30) for times in busy]
        assert at_least <= statistics.median(peak_to_mean) < below


@pytest.mark.parametrize(("kwargs", "problem"), [
    ({"num_functions": 0}, "num_functions"),
    ({"bursty_fraction": 0.6, "timer_fraction": 0.6}, "sum to <= 1"),
    ({"length_correlation": 1.0}, "length_correlation"),
    ({"max_output_tokens": 4088}, "max_output_tokens < max_total_tokens"),
])
def test_synthetic_rejects_bad_arguments(kwargs: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        synthetic_trace(**kwargs)


# ------------------------------------------------------------------------------ transformations

ROWS = [(0.5, "a", 100, 50), (1.0, "b", 200, 20), (2.0, "a", 300, 30), (3.0, "b", 400, 40)]


def test_window_keeps_half_open_interval_and_shifts() -> None:
    window = make_trace(ROWS).window(1.0, 3.0)
    assert [(a.time_s, a.function) for a in window.arrivals] == [(0.0, "b"), (1.0, "a")]
    assert window.duration_s == 2.0
    assert window.functions == ("a", "b")


def test_first_functions_and_select_groups_keep_functions_and_hashes() -> None:
    first = make_trace(ROWS).first_functions(1)
    assert (first.functions, first.hashes) == (("a",), ("h-a",))
    assert [a.time_s for a in first.arrivals] == [0.5, 2.0]

    names = tuple(f"fn-{i:03d}" for i in range(20))
    trace = make_trace([(float(i), name, 1, 1) for i, name in enumerate(names)], functions=names, duration_s=30.0)
    assert trace.select_groups(2).functions == ("fn-000", "fn-001", "fn-008", "fn-009", "fn-016", "fn-017")
    assert trace.select_groups(3, group_size=10).hashes == ("h-fn-000", "h-fn-001", "h-fn-002",
                                                            "h-fn-010", "h-fn-011", "h-fn-012")
    assert [a.function for a in trace.select_groups(1).arrivals] == ["fn-000", "fn-008", "fn-016"]


def test_busiest_keeps_the_functions_with_most_requests_in_trace_order() -> None:
    names = ("a", "b", "c", "d")
    rows = [(float(i), name, 1, 1) for i, name in enumerate(["c", "b", "c", "d", "b", "c", "a", "d"])]
    trace = make_trace(sorted(rows), functions=names, duration_s=30.0)
    assert trace.busiest(1).functions == ("c",)
    assert trace.busiest(2).functions == ("b", "c")  # b and d tie at 2: b comes first in the trace
    assert trace.busiest(3).hashes == ("h-b", "h-c", "h-d")
    assert [a.function for a in trace.busiest(2).arrivals] == ["c", "b", "c", "b", "c"]
    assert trace.busiest(0).arrivals == ()
    with pytest.raises(ValueError, match="the trace has 4 functions"):
        trace.busiest(5)


@pytest.mark.parametrize(("factor", "min_prompt", "min_output", "max_total", "before", "after"), [
    (2.0, 1, 1, None, (100, 50), (200, 100)),
    (0.001, 1, 1, None, (100, 50), (1, 1)),
    (0.5, 1, 1, None, (5, 3), (2, 2)),           # round half to even: 2.5 -> 2, 1.5 -> 2
    (1.0, 1, 1, 120, (100, 50), (70, 50)),       # the prompt shrinks first
    (1.0, 16, 1, 40, (100, 50), (16, 24)),       # then the output, once the prompt is at its minimum
    (3.0, 1, 1, 4088, (1000, 1000), (1088, 3000)),
    (0.01, 8, 4, None, (100, 50), (8, 4)),
])
def test_scale_lengths(factor: float, min_prompt: int, min_output: int, max_total: int | None,
                       before: tuple[int, int], after: tuple[int, int]) -> None:
    trace = make_trace([(1.0, "a", *before)])
    scaled = trace.scale_lengths(factor, min_prompt=min_prompt, min_output=min_output, max_total=max_total)
    assert (scaled.arrivals[0].prompt_tokens, scaled.arrivals[0].output_tokens) == after


def test_scale_time_compresses_the_clock() -> None:
    scaled = make_trace(ROWS).scale_time(0.5)
    assert [a.time_s for a in scaled.arrivals] == [0.25, 0.5, 1.0, 1.5]
    assert scaled.duration_s == 5.0
    assert [a.prompt_tokens for a in scaled.arrivals] == [100, 200, 300, 400]


@pytest.mark.parametrize("call", [
    lambda t: t.window(3.0, 3.0),
    lambda t: t.window(-1.0, 2.0),
    lambda t: t.window(0.0, 11.0),
    lambda t: t.first_functions(3),
    lambda t: t.select_groups(0),
    lambda t: t.select_groups(9),
    lambda t: t.scale_lengths(0.0),
    lambda t: t.scale_lengths(1.0, min_prompt=10, min_output=10, max_total=15),
    lambda t: t.scale_time(-2.0),
])
def test_transformations_reject_bad_arguments(call: Callable[[Trace], Trace]) -> None:
    with pytest.raises(ValueError):
        call(make_trace(ROWS))


def test_stats_count_idle_functions() -> None:
    trace = make_trace([(0.0, "a", 10, 1), (1.0, "a", 20, 2), (2.0, "a", 30, 3), (3.0, "b", 40, 4)],
                       functions=("a", "b", "c"))
    assert trace.requests_per_function() == {"a": 3, "b": 1, "c": 0}
    stats = trace.stats()
    assert (stats["requests"], stats["functions"]) == (4.0, 3.0)
    assert (stats["count_median"], stats["count_max"]) == (1.0, 3.0)
    assert stats["count_p90"] == pytest.approx(2.6)  # between 1 and 3, 0.8 of the way
    assert (stats["prompt_mean"], stats["output_mean"]) == (25.0, 2.5)


@pytest.mark.parametrize(("arrivals", "problem"), [
    ((Arrival(2.0, "a", 1, 1), Arrival(1.0, "b", 1, 1)), "must be sorted"),
    ((Arrival(1.0, "b", 1, 1), Arrival(1.0, "a", 1, 1)), "must be sorted"),
    ((Arrival(1.0, "z", 1, 1),), "not in the trace"),
    ((Arrival(11.0, "a", 1, 1),), "outside"),
    ((Arrival(1.0, "a", -1, 1),), "negative token counts"),
])
def test_trace_rejects_inconsistent_values(arrivals: tuple[Arrival, ...], problem: str) -> None:
    with pytest.raises(TraceError, match=problem):
        Trace(functions=("a", "b"), arrivals=arrivals, duration_s=10.0, source="hand-built")
