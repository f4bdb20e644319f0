"""The function model: what a deployed LLM function is, parsed once at the boundary.

A function is a model plus the promises made about serving it (the SLO) and the knobs for scaling
it. ``parse_function_spec`` turns an untrusted mapping (usually YAML) into a frozen
``FunctionSpec``; everything inward takes the typed value, never the raw dict.

Errors: every problem raises ``SpecError`` (a ``ValueError``). Its message is
``[<file>: ]<dotted.field>: <what is allowed>, got <value>``, e.g.
``slo.tpot_s: must be > 0, got -1``.

This module is pure: no torch, httpx or asyncio imports, no clock or environment reads. The two
loaders read YAML files and nothing else.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from enum import Enum
from pathlib import Path

import yaml

__all__ = [
    "SLO",
    "SloOutcome",
    "DevicePreference",
    "Dtype",
    "FunctionSpec",
    "SpecError",
    "checkpoint_key",
    "load_function_dir",
    "load_function_spec",
    "parse_duration_s",
    "parse_function_spec",
]


class SpecError(ValueError):
    """A function spec is invalid: names the field (dotted path), what is allowed and what was given."""

    def __init__(self, field_path: str, reason: str, *, source: str | None = None) -> None:
        self.field_path = field_path
        self.reason = reason
        self.source = source
        parts = [p for p in (source, field_path) if p]
        super().__init__(": ".join([*parts, reason]))

    def under(self, prefix: str) -> SpecError:
        """The same error for a field nested under ``prefix`` (``tpot_s`` -> ``slo.tpot_s``)."""
        path = f"{prefix}.{self.field_path}" if self.field_path else prefix
        return SpecError(path, self.reason, source=self.source)

    def in_file(self, source: str) -> SpecError:
        """The same error, prefixed with the file it came from."""
        return SpecError(self.field_path, self.reason, source=source)


class DevicePreference(Enum):
    """Where a function's instances may run."""

    CPU = "cpu"
    GPU = "gpu"
    ANY = "any"


_DEVICE_CHOICES = ", ".join(d.value for d in DevicePreference)


class Dtype(Enum):
    """What an instance computes in: weights, activations and KV cache (norms and logits stay in
    float32). bfloat16 halves the memory of both and runs batched work ~2x faster on CPUs with
    bf16 instructions (AVX512-BF16, AMX); int8 is bfloat16 with the linear layers' weights in
    int8 (one scale per output row): a quarter of float32's weight memory, and decode steps that
    read that much less; float32 matches the checkpoint's reference outputs."""

    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    INT8 = "int8"


_DTYPE_CHOICES = ", ".join(d.value for d in Dtype)


def checkpoint_key(model: str, dtype: Dtype) -> str:
    """Names a loaded model: its reference, and the dtype unless float32. Instances of functions
    with one key share one set of weights (a pod's weight cache, the autoscaler's locality)."""
    return model if dtype is Dtype.FLOAT32 else f"{model}#{dtype.value}"
# DNS-1123 label: the function name appears in URLs, metric labels and Kubernetes object names.
_NAME_RE = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_NAME_MAX_CHARS = 63
_MODEL_PREFIXES = ("bundled:", "random:")
_DURATION_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)\s*")
_DURATION_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_HINT = "a number of seconds or a duration like '500ms', '0.5s', '2m'"


def _show(value: object) -> str:
    """A value as an error message shows it: integral floats without '.0', strings quoted."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (Mapping, list, tuple, set)):
        return f"a {type(value).__name__}"
    return repr(value)


def _fail(path: str, rule: str, value: object) -> SpecError:
    return SpecError(path, f"{rule}, got {_show(value)}")


def _check_number(path: str, value: object, *, minimum: float, inclusive: bool) -> float:
    """A finite int or float (bools are not numbers here) within the bound, as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(path, "must be a finite number", value)
    if value < minimum or (value == minimum and not inclusive):
        raise _fail(path, f"must be {'>=' if inclusive else '>'} {_show(float(minimum))}", value)
    return float(value)


def _check_int(path: str, value: object, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(path, "must be an integer", value)
    if value < minimum:
        raise _fail(path, f"must be >= {minimum}", value)
    return value


def _check_text(path: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _fail(path, "must be a non-empty string", value)
    return value


def parse_duration_s(text: str) -> float:
    """Seconds in a duration string: ``"500ms"`` -> 0.5, ``"0.5s"``, ``"2m"`` -> 120.0, ``"1h"``.

    Raises ``ValueError`` for anything else (a bare number, an unknown unit, a sign).
    """
    match = _DURATION_RE.fullmatch(text)
    if match is None:
        raise ValueError(f"not a duration: {text!r}; expected e.g. '500ms', '0.5s', '2m', '1h'")
    return float(match.group(1)) * _DURATION_UNIT_S[match.group(2)]


def _seconds(path: str, value: object) -> object:
    """A duration field's raw value with unit strings turned into seconds; other values pass on."""
    if not isinstance(value, str):
        return value
    try:
        return parse_duration_s(value)
    except ValueError:
        raise _fail(path, f"must be {_DURATION_HINT}", value) from None


class SloOutcome(Enum):
    """How a finished request did against its function's SLO (``SLO.judge``)."""

    MET = "met"
    TTFT_MISSED = "ttft_missed"
    TPOT_MISSED = "tpot_missed"


@dataclass(frozen=True, kw_only=True)
class SLO:
    """Latency targets: time to first token scales with the prompt, then a bound per output token."""

    ttft_base_s: float = 0.5
    prefill_rate_tok_s: float = 512.0
    tpot_s: float = 0.25

    def __post_init__(self) -> None:
        for f in fields(self):
            value = _check_number(f.name, getattr(self, f.name), minimum=0.0, inclusive=False)
            object.__setattr__(self, f.name, value)

    def ttft_s(self, prompt_tokens: int) -> float:
        """The time-to-first-token target for a prompt of ``prompt_tokens`` tokens."""
        return max(self.ttft_base_s, prompt_tokens / self.prefill_rate_tok_s)

    def judge(self, prompt_tokens: int, ttft_s: float, output_tokens: int, decode_s: float) -> SloOutcome:
        """Whether a finished request met this SLO, as the paper scores it: its first token within
        ``ttft_s(prompt_tokens)``, then a mean time per output token (``decode_s`` from the
        first token to the last, over the ``output_tokens - 1`` after it) within ``tpot_s``."""
        if ttft_s > self.ttft_s(prompt_tokens):
            return SloOutcome.TTFT_MISSED
        if output_tokens > 1 and decode_s / (output_tokens - 1) > self.tpot_s:
            return SloOutcome.TPOT_MISSED
        return SloOutcome.MET

    def to_dict(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True, kw_only=True)
class FunctionSpec:
    """One deployable LLM function. Construct with ``parse_function_spec`` from untrusted data.

    ``event_source`` left empty becomes ``/slinfer/functions/<name>``. ``output_schema``: a JSON
    schema every answer follows (a mapping in YAML; kept as compact JSON text so the spec stays
    hashable), unless a request asks for its own ``response_format``; CloudEvent replies then
    carry the JSON as ``application/json``.
    """

    name: str
    model: str
    slo: SLO = SLO()
    max_context_tokens: int = 2048
    max_output_tokens: int = 512
    device: DevicePreference = DevicePreference.ANY
    keep_alive_s: float = 60.0
    max_instances: int = 4
    system_prompt: str | None = None
    event_template: str = "{data}"
    event_type: str = "dev.slinfer.response"
    event_source: str = ""
    timeout_s: float = 300.0
    output_schema: str | None = None
    dtype: Dtype = Dtype.FLOAT32

    def __post_init__(self) -> None:
        _check_name(self.name)
        _check_model(self.model)
        if not isinstance(self.slo, SLO):
            raise _fail("slo", "must be an SLO", self.slo)
        _check_int("max_context_tokens", self.max_context_tokens, minimum=1)
        _check_int("max_output_tokens", self.max_output_tokens, minimum=1)
        if self.max_output_tokens >= self.max_context_tokens:
            rule = f"must be < max_context_tokens ({self.max_context_tokens})"
            raise _fail("max_output_tokens", rule, self.max_output_tokens)
        if not isinstance(self.device, DevicePreference):
            raise _fail("device", f"must be one of {_DEVICE_CHOICES}", self.device)
        keep_alive_s = _check_number("keep_alive_s", self.keep_alive_s, minimum=0.0, inclusive=True)
        _check_int("max_instances", self.max_instances, minimum=1)
        if self.system_prompt is not None and not isinstance(self.system_prompt, str):
            raise _fail("system_prompt", "must be a string or null", self.system_prompt)
        if not isinstance(self.event_template, str) or "{data}" not in self.event_template:
            raise _fail("event_template", "must be a string containing '{data}'", self.event_template)
        _check_text("event_type", self.event_type)
        if not isinstance(self.event_source, str):
            raise _fail("event_source", "must be a string", self.event_source)
        timeout_s = _check_number("timeout_s", self.timeout_s, minimum=0.0, inclusive=False)
        if self.output_schema is not None:
            object.__setattr__(self, "output_schema", _schema_text(self.output_schema))
        if not isinstance(self.dtype, Dtype):
            raise _fail("dtype", f"must be one of {_DTYPE_CHOICES}", self.dtype)
        object.__setattr__(self, "keep_alive_s", keep_alive_s)
        object.__setattr__(self, "timeout_s", timeout_s)
        if not self.event_source:
            object.__setattr__(self, "event_source", f"/slinfer/functions/{self.name}")

    @property
    def checkpoint(self) -> str:
        """The loaded model this function's instances use (``checkpoint_key``)."""
        return checkpoint_key(self.model, self.dtype)

    @functools.cached_property  # (a frozen spec: read on every status, route and rollout round)
    def instance_digest(self) -> str:
        """What an instance of this function serves, in 16 hex digits: the fields a runtime pod
        uses (model, dtype, SLO, limits, system prompt, output schema). A redeploy that changes
        one needs new instances; one that changes only scaling or event fields does not. Fields
        at a default ``to_dict`` leaves out (or None) are left out here too, so a field added later
        with such a default does not change every deployed function's digest (and roll them all)."""
        d = self.to_dict()
        served = {k: d[k] for k in _INSTANCE_KEYS if d.get(k) is not None}
        return hashlib.sha256(json.dumps(served, sort_keys=True).encode()).hexdigest()[:16]

    def event_prompt(self, data: str) -> str:
        """The prompt for a CloudEvent whose data is ``data``: each ``{data}`` replaced verbatim."""
        return self.event_template.replace("{data}", data)

    def to_dict(self) -> dict[str, object]:
        """Plain data (YAML/JSON-ready) that ``parse_function_spec`` turns back into this spec."""
        out: dict[str, object] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, SLO):
                value = value.to_dict()
            elif isinstance(value, DevicePreference):
                value = value.value
            elif f.name == "output_schema":
                if value is None:
                    continue  # left out, so a spec without one reads as it did before the field existed
                value = json.loads(value)
            elif f.name == "dtype":
                if value is Dtype.FLOAT32:
                    continue  # likewise: older pods and activators in a rolling upgrade still take it
                value = value.value
            out[f.name] = value
        return out


def _schema_text(value: object) -> str:
    """A JSON schema (a mapping, or JSON text of one) as compact JSON text. Whether llguidance can
    enforce it is checked where the model is (the pod, at load: ``model_load_failed``)."""
    rule = "must be a JSON schema: a mapping (or JSON text of one) such as {type: object, properties: {...}}"
    schema = value
    if isinstance(value, str):
        try:
            schema = json.loads(value)
        except ValueError:
            raise _fail("output_schema", rule, value) from None
    if not isinstance(schema, Mapping):
        raise _fail("output_schema", rule, value)
    try:
        return json.dumps(schema, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError):  # YAML dates, sets, NaN: not JSON
        raise _fail("output_schema", rule, value) from None


def _check_name(value: object) -> None:
    rule = (
        f"must be a DNS-1123 label (lowercase letters, digits and '-', starting with a letter, "
        f"ending with a letter or digit, at most {_NAME_MAX_CHARS} characters)"
    )
    if not isinstance(value, str) or len(value) > _NAME_MAX_CHARS or not _NAME_RE.fullmatch(value):
        raise _fail("name", rule, value)


def _check_model(value: object) -> None:
    model = _check_text("model", value)
    for prefix in _MODEL_PREFIXES:
        if model.startswith(prefix) and not model[len(prefix) :].split("?", 1)[0].strip():
            raise _fail("model", f"must name a model after '{prefix}', e.g. '{prefix}<name>'", value)


_SLO_KEYS = tuple(f.name for f in fields(SLO))
_SPEC_KEYS = tuple(f.name for f in fields(FunctionSpec))
# the fields a runtime pod reads from a spec (FunctionSpec.instance_digest)
_INSTANCE_KEYS = ("model", "dtype", "slo", "max_context_tokens", "max_output_tokens", "system_prompt",
                  "output_schema")
_REQUIRED_KEYS = ("name", "model")
_DURATION_KEYS = ("keep_alive_s", "timeout_s")
_SLO_DURATION_KEYS = ("ttft_base_s", "tpot_s")  # prefill_rate_tok_s is a rate, not a duration


def _check_keys(data: object, known: tuple[str, ...], what: str) -> Mapping[str, object]:
    if not isinstance(data, Mapping):
        raise SpecError("", f"must be a mapping of {what} fields ({', '.join(known)}), got {_show(data)}")
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise SpecError(str(key), f"unknown key; {hint}known keys: {', '.join(known)}")
    return data


def _parse_slo(data: object) -> SLO:
    raw = dict(_check_keys(data, _SLO_KEYS, "SLO"))
    for key in _SLO_DURATION_KEYS:
        if key in raw:
            raw[key] = _seconds(key, raw[key])
    return SLO(**raw)  # type: ignore[arg-type]  # values are checked in SLO.__post_init__


def parse_function_spec(data: Mapping[str, object]) -> FunctionSpec:
    """A validated ``FunctionSpec`` from plain data (the YAML shape); raises ``SpecError``."""
    raw = dict(_check_keys(data, _SPEC_KEYS, "function"))
    for key in _REQUIRED_KEYS:
        if key not in raw:
            raise SpecError(key, "required field is missing")
    if "slo" in raw:
        try:
            raw["slo"] = _parse_slo(raw["slo"])
        except SpecError as err:
            raise err.under("slo") from None
    for key, kind, names in (("device", DevicePreference, _DEVICE_CHOICES), ("dtype", Dtype, _DTYPE_CHOICES)):
        if key in raw:
            value = raw[key]
            choices = {member.value: member for member in kind}
            if not isinstance(value, str) or value not in choices:
                raise _fail(key, f"must be one of {names}", value)
            raw[key] = choices[value]
    for key in _DURATION_KEYS:
        if key in raw:
            raw[key] = _seconds(key, raw[key])
    if "event_source" in raw:
        _check_text("event_source", raw["event_source"])
    return FunctionSpec(**raw)  # type: ignore[arg-type]  # values are checked in __post_init__


def load_function_spec(path: str | os.PathLike[str]) -> FunctionSpec:
    """The function defined in one YAML file; ``SpecError`` messages start with the file path."""
    source = os.fspath(path)
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        return parse_function_spec(data)
    except SpecError as err:
        raise err.in_file(source) from None
    except yaml.YAMLError as err:
        raise SpecError("", f"not valid YAML: {err}", source=source) from None


def load_function_dir(path: str | os.PathLike[str]) -> list[FunctionSpec]:
    """Every function in a folder's ``*.yaml``/``*.yml`` files, sorted by function name.

    Files are read in file-name order; two files defining the same function name are an error
    naming both.
    """
    files = sorted(p for p in Path(path).iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
    by_name: dict[str, tuple[FunctionSpec, Path]] = {}
    for file in files:
        spec = load_function_spec(file)
        if spec.name in by_name:
            first = by_name[spec.name][1]
            rule = f"function {spec.name!r} is already defined in {first}; names must be unique"
            raise SpecError("name", rule, source=str(file))
        by_name[spec.name] = (spec, file)
    return [by_name[name][0] for name in sorted(by_name)]
