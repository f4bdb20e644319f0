"""Tests for functions.spec: parsing, validation messages, durations, loaders and round trips."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import yaml

from functions import (
    EXAMPLES_DIR,
    SLO,
    DevicePreference,
    Dtype,
    FunctionSpec,
    SloOutcome,
    SpecError,
    load_function_dir,
    load_function_spec,
    parse_duration_s,
    parse_function_spec,
)

KNOWN_KEYS = (
    "name, model, slo, max_context_tokens, max_output_tokens, device, keep_alive_s, max_instances, "
    "system_prompt, event_template, event_type, event_source, timeout_s, output_schema, dtype"
)
SCHEMA_RULE = "must be a JSON schema: a mapping (or JSON text of one) such as {type: object, properties: {...}}"
NAME_RULE = (
    "must be a DNS-1123 label (lowercase letters, digits and '-', starting with a letter, "
    "ending with a letter or digit, at most 63 characters)"
)
DURATION_RULE = "must be a number of seconds or a duration like '500ms', '0.5s', '2m'"


def make_data(**overrides: object) -> dict[str, object]:
    """A valid minimal spec mapping with ``overrides`` applied."""
    data: dict[str, object] = {"name": "fn", "model": "random:llama-tiny?seed=0"}
    data.update(overrides)
    return data


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --- defaults and the examples ---------------------------------------------------------------


def test_minimal_spec_fills_every_default() -> None:
    spec = parse_function_spec(make_data())

    assert spec.to_dict() == {
        "name": "fn",
        "model": "random:llama-tiny?seed=0",
        "slo": {"ttft_base_s": 0.5, "prefill_rate_tok_s": 512.0, "tpot_s": 0.25},
        "max_context_tokens": 2048,
        "max_output_tokens": 512,
        "device": "any",
        "keep_alive_s": 60.0,
        "max_instances": 4,
        "system_prompt": None,
        "event_template": "{data}",
        "event_type": "dev.slinfer.response",
        "event_source": "/slinfer/functions/fn",
        "timeout_s": 300.0,
    }  # no output_schema: left out when unset, so older readers of the dict still take it
    assert spec.device is DevicePreference.ANY


def test_examples_load_as_documented() -> None:
    specs = load_function_dir(EXAMPLES_DIR)

    summary = [(s.name, s.model, s.device, s.system_prompt is not None) for s in specs]
    assert summary == [
        ("chat", "bundled:smollm2-135m-instruct", DevicePreference.ANY, True),
        ("classify", "bundled:smollm2-135m-instruct", DevicePreference.ANY, True),
        ("summarize", "bundled:smollm2-135m-instruct", DevicePreference.CPU, True),
        ("tiny-echo", "random:llama-tiny?seed=0", DevicePreference.ANY, False),
    ]
    summarize = specs[2]
    assert json.loads(specs[1].output_schema or "")["required"] == ["sentiment"]
    assert summarize.event_prompt("TEXT") == "Summarize the following in one sentence:\n\nTEXT"
    assert "one sentence" in (summarize.system_prompt or "")
    assert (summarize.slo.ttft_base_s, summarize.slo.tpot_s, summarize.keep_alive_s) == (1.0, 0.25, 120.0)


# --- SLO ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("slo", "prompt_tokens", "expected_s"),
    [
        (SLO(), 0, 0.5),
        (SLO(), 100, 0.5),  # under the base: the base wins
        (SLO(), 256, 0.5),  # exactly at the crossover
        (SLO(), 512, 1.0),
        (SLO(), 2048, 4.0),
        (SLO(ttft_base_s=2.0, prefill_rate_tok_s=100.0), 150, 2.0),
        (SLO(ttft_base_s=2.0, prefill_rate_tok_s=100.0), 300, 3.0),
    ],
)
def test_ttft_is_the_larger_of_base_and_prefill_time(slo: SLO, prompt_tokens: int, expected_s: float) -> None:
    assert slo.ttft_s(prompt_tokens) == pytest.approx(expected_s)


@pytest.mark.parametrize("field", ["ttft_base_s", "prefill_rate_tok_s", "tpot_s"])
@pytest.mark.parametrize("value", [0, -1])
def test_slo_rejects_non_positive_values(field: str, value: int) -> None:
    with pytest.raises(SpecError) as err:
        SLO(**{field: value})
    assert str(err.value) == f"{field}: must be > 0, got {value}"
    assert err.value.field_path == field


# --- durations ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("0.5s", 0.5),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1.5m", 90.0),
        (" 3 s ", 3.0),
        (".25s", 0.25),
    ],
)
def test_duration_strings_parse_to_seconds(text: str, seconds: float) -> None:
    assert parse_duration_s(text) == pytest.approx(seconds)
    spec = parse_function_spec(make_data(keep_alive_s=text, timeout_s=text, slo={"tpot_s": text}))
    assert (spec.keep_alive_s, spec.timeout_s, spec.slo.tpot_s) == pytest.approx((seconds,) * 3)


@pytest.mark.parametrize("text", ["", "5", "abc", "5 parsecs", "-1s", "1e3s", "s", "5ms5", "2 m s", "1d"])
def test_junk_durations_are_rejected(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration_s(text)
    with pytest.raises(SpecError) as err:
        parse_function_spec(make_data(timeout_s=text))
    assert str(err.value) == f"timeout_s: {DURATION_RULE}, got {text!r}"


def test_prefill_rate_is_not_a_duration() -> None:
    with pytest.raises(SpecError) as err:
        parse_function_spec(make_data(slo={"prefill_rate_tok_s": "2s"}))
    assert str(err.value) == "slo.prefill_rate_tok_s: must be a finite number, got '2s'"


# --- accepted values ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "attribute", "expected"),
    [
        ({"keep_alive_s": 0}, "keep_alive_s", 0.0),  # scale to zero at once
        ({"keep_alive_s": 30}, "keep_alive_s", 30.0),  # ints accepted for floats
        ({"timeout_s": 1.5}, "timeout_s", 1.5),
        ({"device": "cpu"}, "device", DevicePreference.CPU),
        ({"device": "gpu"}, "device", DevicePreference.GPU),
        ({"max_context_tokens": 2, "max_output_tokens": 1}, "max_output_tokens", 1),
        ({"max_instances": 1}, "max_instances", 1),
        ({"name": "a"}, "name", "a"),
        ({"name": "a" * 63}, "name", "a" * 63),
        ({"name": "my-fn-2"}, "name", "my-fn-2"),
        ({"model": "/models/llama.gguf"}, "model", "/models/llama.gguf"),
        ({"model": "bundled:smollm2-135m-instruct"}, "model", "bundled:smollm2-135m-instruct"),
        ({"system_prompt": None}, "system_prompt", None),
        ({"event_source": "/custom/source"}, "event_source", "/custom/source"),
        ({"event_template": "Q: {data}\nA: {data}"}, "event_template", "Q: {data}\nA: {data}"),
    ],
)
def test_accepted_values(overrides: dict[str, object], attribute: str, expected: object) -> None:
    spec = parse_function_spec(make_data(**overrides))
    value = getattr(spec, attribute)
    assert value == expected
    assert type(value) is type(expected)


# --- rejected values: the exact message is the contract ---------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        # name
        ({"name": "Chat"}, f"name: {NAME_RULE}, got 'Chat'"),
        ({"name": "2fast"}, f"name: {NAME_RULE}, got '2fast'"),
        ({"name": "trailing-"}, f"name: {NAME_RULE}, got 'trailing-'"),
        ({"name": "under_score"}, f"name: {NAME_RULE}, got 'under_score'"),
        ({"name": ""}, f"name: {NAME_RULE}, got ''"),
        ({"name": "a" * 64}, f"name: {NAME_RULE}, got '{'a' * 64}'"),
        ({"name": 7}, f"name: {NAME_RULE}, got 7"),
        # model
        ({"model": ""}, "model: must be a non-empty string, got ''"),
        ({"model": "  "}, "model: must be a non-empty string, got '  '"),
        ({"model": None}, "model: must be a non-empty string, got None"),
        (
            {"model": "bundled:"},
            "model: must name a model after 'bundled:', e.g. 'bundled:<name>', got 'bundled:'",
        ),
        (
            {"model": "random:?seed=0"},
            "model: must name a model after 'random:', e.g. 'random:<name>', got 'random:?seed=0'",
        ),
        # slo
        ({"slo": {"tpot_s": -1}}, "slo.tpot_s: must be > 0, got -1"),
        ({"slo": {"ttft_base_s": 0}}, "slo.ttft_base_s: must be > 0, got 0"),
        ({"slo": {"ttft_base_s": "0ms"}}, "slo.ttft_base_s: must be > 0, got 0"),
        ({"slo": {"prefill_rate_tok_s": True}}, "slo.prefill_rate_tok_s: must be a finite number, got True"),
        ({"slo": {"tpot_s": None}}, "slo.tpot_s: must be a finite number, got None"),
        (
            {"slo": {"tpot": 1}},
            "slo.tpot: unknown key; did you mean 'tpot_s'? known keys: ttft_base_s, prefill_rate_tok_s, tpot_s",
        ),
        (
            {"slo": 5},
            "slo: must be a mapping of SLO fields (ttft_base_s, prefill_rate_tok_s, tpot_s), got 5",
        ),
        # device
        ({"device": "tpu"}, "device: must be one of cpu, gpu, any, got 'tpu'"),
        ({"device": "CPU"}, "device: must be one of cpu, gpu, any, got 'CPU'"),
        ({"device": None}, "device: must be one of cpu, gpu, any, got None"),
        # integers
        ({"max_instances": "4"}, "max_instances: must be an integer, got '4'"),
        ({"max_instances": True}, "max_instances: must be an integer, got True"),
        ({"max_instances": 0}, "max_instances: must be >= 1, got 0"),
        ({"max_context_tokens": 1.5}, "max_context_tokens: must be an integer, got 1.5"),
        ({"max_context_tokens": 0}, "max_context_tokens: must be >= 1, got 0"),
        ({"max_output_tokens": 0}, "max_output_tokens: must be >= 1, got 0"),
        ({"max_output_tokens": 2048}, "max_output_tokens: must be < max_context_tokens (2048), got 2048"),
        (
            {"max_context_tokens": 100, "max_output_tokens": 512},
            "max_output_tokens: must be < max_context_tokens (100), got 512",
        ),
        # durations and other floats
        ({"keep_alive_s": -1}, "keep_alive_s: must be >= 0, got -1"),
        ({"keep_alive_s": -0.5}, "keep_alive_s: must be >= 0, got -0.5"),
        ({"keep_alive_s": True}, "keep_alive_s: must be a finite number, got True"),
        ({"keep_alive_s": math.nan}, "keep_alive_s: must be a finite number, got nan"),
        ({"timeout_s": math.inf}, "timeout_s: must be a finite number, got inf"),
        ({"timeout_s": 0}, "timeout_s: must be > 0, got 0"),
        ({"timeout_s": [1]}, "timeout_s: must be a finite number, got a list"),
        # strings
        ({"system_prompt": 5}, "system_prompt: must be a string or null, got 5"),
        (
            {"event_template": "no placeholder"},
            "event_template: must be a string containing '{data}', got 'no placeholder'",
        ),
        ({"event_template": "{Data}"}, "event_template: must be a string containing '{data}', got '{Data}'"),
        ({"event_type": ""}, "event_type: must be a non-empty string, got ''"),
        ({"event_source": ""}, "event_source: must be a non-empty string, got ''"),
        ({"event_source": 3}, "event_source: must be a non-empty string, got 3"),
        # output_schema (whether llguidance can enforce it is the pod's check, at load)
        ({"output_schema": [1]}, f"output_schema: {SCHEMA_RULE}, got a list"),
        ({"output_schema": "{not json"}, f"output_schema: {SCHEMA_RULE}, got '{{not json'"),
        ({"output_schema": "[1]"}, f"output_schema: {SCHEMA_RULE}, got '[1]'"),
        ({"output_schema": {"maximum": math.nan}}, f"output_schema: {SCHEMA_RULE}, got a dict"),
        ({"dtype": "float16"}, "dtype: must be one of float32, bfloat16, int8, got 'float16'"),
        ({"dtype": 16}, "dtype: must be one of float32, bfloat16, int8, got 16"),
        # keys
        (
            {"max_instance": 2},
            f"max_instance: unknown key; did you mean 'max_instances'? known keys: {KNOWN_KEYS}",
        ),
        ({"zzz": 1}, f"zzz: unknown key; known keys: {KNOWN_KEYS}"),
    ],
)
def test_rejected_values_name_field_rule_and_value(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_function_spec(make_data(**overrides))
    assert str(err.value) == message


@pytest.mark.parametrize("missing", ["name", "model"])
def test_required_fields(missing: str) -> None:
    data = make_data()
    del data[missing]
    with pytest.raises(SpecError) as err:
        parse_function_spec(data)
    assert str(err.value) == f"{missing}: required field is missing"


def test_spec_error_is_a_value_error_with_structured_parts() -> None:
    with pytest.raises(ValueError) as err:
        parse_function_spec(make_data(slo={"tpot_s": -1}))
    assert isinstance(err.value, SpecError)
    assert (err.value.field_path, err.value.reason, err.value.source) == (
        "slo.tpot_s",
        "must be > 0, got -1",
        None,
    )


# --- direct construction -----------------------------------------------------------------------


def test_direct_construction_validates_too() -> None:
    with pytest.raises(SpecError, match=r"^name: must be a DNS-1123 label"):
        FunctionSpec(name="Bad", model="random:llama-tiny")
    with pytest.raises(SpecError, match=r"^max_output_tokens: must be < max_context_tokens \(8\), got 8$"):
        FunctionSpec(name="ok", model="random:llama-tiny", max_context_tokens=8, max_output_tokens=8)


def test_specs_are_frozen() -> None:
    spec = FunctionSpec(name="ok", model="random:llama-tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.max_instances = 9  # type: ignore[misc]


def test_event_source_defaults_from_name_unless_given() -> None:
    assert FunctionSpec(name="ok", model="m").event_source == "/slinfer/functions/ok"
    assert FunctionSpec(name="ok", model="m", event_source="/x").event_source == "/x"


def test_event_prompt_substitutes_data_verbatim() -> None:
    spec = FunctionSpec(name="ok", model="m", event_template="<{data}> and {data}")
    assert spec.event_prompt("{json: 1}") == "<{json: 1}> and {json: 1}"


# --- round trip --------------------------------------------------------------------------------

def test_an_output_schema_is_kept_as_compact_json_and_given_back_as_a_mapping() -> None:
    schema = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"enum": ["x", "y"]}}}
    spec = parse_function_spec(make_data(output_schema=schema))
    assert spec.output_schema == '{"properties":{"a":{"enum":["x","y"]},"b":{"type":"integer"}},"type":"object"}'
    assert spec.to_dict()["output_schema"] == schema
    assert parse_function_spec(make_data(output_schema=json.dumps(schema))) == spec  # JSON text too
    assert hash(spec) == hash(parse_function_spec(spec.to_dict()))


EVERY_FIELD_CHANGED = FunctionSpec(
    name="custom",
    model="/models/x.gguf",
    slo=SLO(ttft_base_s=1.25, prefill_rate_tok_s=100.0, tpot_s=0.1),
    max_context_tokens=4096,
    max_output_tokens=1000,
    device=DevicePreference.GPU,
    keep_alive_s=0.0,
    max_instances=7,
    system_prompt="Be brief.",
    event_template="In: {data}",
    event_type="com.example.out",
    event_source="/custom",
    timeout_s=12.5,
    output_schema='{"type":"object"}',
    dtype=Dtype.BFLOAT16,
)


def test_dtype_names_the_checkpoint_and_is_left_out_of_the_dict_when_float32() -> None:
    plain = parse_function_spec(make_data())
    assert plain.dtype is Dtype.FLOAT32 and plain.checkpoint == plain.model and "dtype" not in plain.to_dict()
    bf16 = parse_function_spec(make_data(dtype="bfloat16"))
    assert bf16.checkpoint == f"{bf16.model}#bfloat16" and bf16.to_dict()["dtype"] == "bfloat16"
    assert parse_function_spec(bf16.to_dict()) == bf16


@pytest.mark.parametrize("prompt_tokens, ttft_s, output_tokens, decode_s, outcome", [
    (100, 0.5, 11, 2.5, SloOutcome.MET),  # TTFT max(0.5, 100/512); 10 gaps of 0.25 s
    (100, 0.51, 11, 0.0, SloOutcome.TTFT_MISSED),
    (1024, 1.9, 1, 0.0, SloOutcome.MET),  # a long prompt earns 2 s
    (1024, 2.1, 1, 0.0, SloOutcome.TTFT_MISSED),
    (100, 0.1, 11, 2.6, SloOutcome.TPOT_MISSED),  # the mean, not each gap
    (100, 0.9, 11, 9.0, SloOutcome.TTFT_MISSED),  # the first miss is the one counted
    (100, 0.1, 1, 5.0, SloOutcome.MET),  # one token: no time per output token
])
def test_slo_judges_a_finished_request_as_the_paper_scores(prompt_tokens: int, ttft_s: float, output_tokens: int,
                                                         decode_s: float, outcome: SloOutcome) -> None:
    assert SLO().judge(prompt_tokens, ttft_s, output_tokens, decode_s) is outcome


# What a runtime pod reads from a spec (a change needs new instances), and what only the
# autoscaler and activator read. A new field must be put in one of the two.
SERVED_FIELDS = {"model", "dtype", "slo", "max_context_tokens", "max_output_tokens", "system_prompt", "output_schema"}
SCALING_FIELDS = {"name", "device", "keep_alive_s", "max_instances", "event_template", "event_type", "event_source",
                  "timeout_s"}


def test_instance_digest_changes_with_what_an_instance_serves_and_nothing_else() -> None:
    assert {f.name for f in dataclasses.fields(FunctionSpec)} == SERVED_FIELDS | SCALING_FIELDS
    base = parse_function_spec(make_data())
    changed = []
    for f in dataclasses.fields(FunctionSpec):
        if f.name == "name":
            continue
        other = dataclasses.replace(base, **{f.name: getattr(EVERY_FIELD_CHANGED, f.name)})
        if other.instance_digest != base.instance_digest:
            changed.append(f.name)
    assert set(changed) == SERVED_FIELDS
    assert len(base.instance_digest) == 16 and base.instance_digest == parse_function_spec(make_data()).instance_digest


def test_a_served_field_added_later_at_an_omitted_default_keeps_every_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    # Else an upgraded autoscaler would find every deployed instance stale and roll them all.
    import functions.spec as spec_module

    def specs() -> list[FunctionSpec]:  # new objects each time: the digest is cached per spec
        return [parse_function_spec(make_data()), parse_function_spec(EVERY_FIELD_CHANGED.to_dict())]

    before = [s.instance_digest for s in specs()]
    monkeypatch.setattr(spec_module, "_INSTANCE_KEYS", (*spec_module._INSTANCE_KEYS, "a_future_field"))
    assert [s.instance_digest for s in specs()] == before


def test_every_field_changed_differs_from_defaults_everywhere() -> None:
    # Guards the round-trip test below: a field left at its default would not be exercised.
    minimal = parse_function_spec(make_data()).to_dict()
    changed = EVERY_FIELD_CHANGED.to_dict()
    assert [k for k in changed if changed[k] == minimal.get(k)] == []
    slo_changed, slo_default = changed["slo"], minimal["slo"]
    assert isinstance(slo_changed, dict) and isinstance(slo_default, dict)
    assert [k for k in slo_changed if slo_changed[k] == slo_default[k]] == []


@pytest.mark.parametrize(
    "spec",
    [EVERY_FIELD_CHANGED, *load_function_dir(EXAMPLES_DIR)],
    ids=lambda s: s.name,
)
def test_to_dict_round_trips_through_yaml(spec: FunctionSpec) -> None:
    text = yaml.safe_dump(spec.to_dict())
    assert parse_function_spec(yaml.safe_load(text)) == spec


# --- files -------------------------------------------------------------------------------------


def test_load_function_spec_prefixes_errors_with_the_path(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.yaml", "name: bad\nmodel: bundled:x\nslo: {tpot_s: -1}\n")
    with pytest.raises(SpecError) as err:
        load_function_spec(path)
    assert str(err.value) == f"{path}: slo.tpot_s: must be > 0, got -1"
    assert err.value.source == str(path)


@pytest.mark.parametrize(
    ("text", "message_start"),
    [
        ("", "must be a mapping of function fields (name, model, "),
        ("- a\n- b\n", "must be a mapping of function fields"),
        ("name: [unclosed\n", "not valid YAML: "),
        ("name: x\n\tmodel: y\n", "not valid YAML: "),
    ],
)
def test_load_function_spec_rejects_non_specs(tmp_path: Path, text: str, message_start: str) -> None:
    path = write(tmp_path / "f.yaml", text)
    with pytest.raises(SpecError) as err:
        load_function_spec(path)
    assert str(err.value).startswith(f"{path}: {message_start}")


def test_load_function_dir_sorts_by_function_name_and_skips_other_files(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "name: zeta\nmodel: random:llama-tiny\n")
    write(tmp_path / "b.yml", "name: alpha\nmodel: random:llama-tiny\n")
    write(tmp_path / "c.yaml", "name: mid\nmodel: random:llama-tiny\n")
    write(tmp_path / "notes.txt", "name: ignored\n")
    write(tmp_path / "d.json", "{}")
    (tmp_path / "sub.yaml").mkdir()

    assert [s.name for s in load_function_dir(tmp_path)] == ["alpha", "mid", "zeta"]


def test_load_function_dir_of_nothing_is_empty(tmp_path: Path) -> None:
    assert load_function_dir(tmp_path) == []


def test_load_function_dir_rejects_duplicate_names_naming_both_files(tmp_path: Path) -> None:
    first = write(tmp_path / "one.yaml", "name: chat\nmodel: random:llama-tiny\n")
    second = write(tmp_path / "two.yml", "name: chat\nmodel: bundled:smollm2-135m-instruct\n")
    with pytest.raises(SpecError) as err:
        load_function_dir(tmp_path)
    assert (
        str(err.value)
        == f"{second}: name: function 'chat' is already defined in {first}; names must be unique"
    )


def test_load_function_dir_reports_the_bad_file(tmp_path: Path) -> None:
    write(tmp_path / "good.yaml", "name: good\nmodel: random:llama-tiny\n")
    bad = write(tmp_path / "bad.yaml", "name: bad\nmodel: random:llama-tiny\ndevice: tpu\n")
    with pytest.raises(SpecError) as err:
        load_function_dir(tmp_path)
    assert str(err.value) == f"{bad}: device: must be one of cpu, gpu, any, got 'tpu'"
