"""OpenAI-compatible request bodies (the subset we serve) and error shapes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationInfo,
    field_validator,
    model_validator,
)

MAX_CHOICES = 16  # n: choices of one answer
MAX_TOP_LOGPROBS = 20  # OpenAI's chat limit; the completions API's 5 is raised to it, as vLLM does

# Stop strings are matched against the text after every token of the request, on the device's
# thread: a few short ones is what they are for (OpenAI takes up to 4).
MAX_STOPS = 16
MAX_STOP_CHARS = 1024


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class JsonSchemaFormat(BaseModel):
    name: str = "response"
    schema_: dict[str, Any] = Field(default_factory=lambda: {"type": "object"}, alias="schema")
    strict: StrictBool | None = None  # we always enforce the schema
    description: str | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs 'json_schema': {'name': ..., 'schema': {...}}")
        return self

    def output_schema(self) -> dict[str, Any] | None:
        """The JSON schema the output must follow; None for plain text."""
        if self.type == "json_object":
            return {"type": "object"}
        if self.type == "json_schema":
            assert self.json_schema is not None
            return self.json_schema.schema_
        return None


class _SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields we do not use (user, ...)

    model: str
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] = 1  # each choice its own request on the device
    # Strict: "no" or "false" must not read as a boolean here and as truthy in the activator.
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: Annotated[int, Field(ge=-(2**63), lt=2**64)] | None = None  # what torch's generators take
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    # token id (a JSON key, so a string) -> added to its logit; the ids are checked against the
    # model's vocabulary once the model is known
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    # JSON output, enforced token by token (runtime.engine.structured); also taken by
    # /v1/completions, as vLLM does (and as a chat stream continued there needs)
    response_format: ResponseFormat | None = None

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        seen: set[int] = set()
        for k in v or {}:
            if not k.isdecimal() or not k.isascii():
                raise ValueError(f"keys must be token ids (non-negative integers), got {k[:40]!r}")
            if int(k) in seen:
                raise ValueError(f"token id {int(k)} is given twice")
            seen.add(int(k))
        return v

    def bias(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(k), float(b)) for k, b in (self.logit_bias or {}).items())

    # Fields of OpenAI's API that change what the client gets back and that we do not implement,
    # with the values that ask for nothing. A request setting one to anything else is refused (400
    # unsupported_parameter) rather than answered as if it had not asked: a client that asked for
    # JSON, tool calls or logprobs and got plain text could not tell. Fields that change nothing a
    # client reads (user, metadata, store, parallel_tool_calls, ...) are ignored.
    NEUTRAL: ClassVar[dict[str, tuple[object, ...]]] = {}

    def unsupported(self) -> str | None:
        """The first field this request sets to something we do not serve (NEUTRAL)."""
        for name, neutral in self.NEUTRAL.items():
            if getattr(self, name) not in neutral:
                return name
        return None

    @field_validator("stop")
    @classmethod
    def _few_short_stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else v or []
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings, got {len(stops)}")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop string may have at most {MAX_STOP_CHARS} characters")
        return v

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        return tuple(s for s in stops if s)


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int]
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None  # true is chat's, not this
    # slinfer extension: logprobs in chat's shape, for a chat stream the activator continues here
    chat_logprobs: StrictBool = False
    # the prompt's text first, and with logprobs its tokens' (the first has none); with
    # max_tokens 0 only that: how evaluation harnesses score a text's likelihood
    echo: StrictBool | None = None
    best_of: Any = None
    suffix: Any = None
    NEUTRAL = {"best_of": (None, 1), "suffix": (None, "")}
    max_tokens: Annotated[int, Field(ge=0)] | None = 16
    # slinfer extension for continuing a preempted stream: the prompt is token ids (prompt +
    # output so far) and its last `resumed_tokens` ids are output the client already received.
    resumed_tokens: Annotated[int, Field(ge=0)] = 0

    @field_validator("max_tokens")
    @classmethod
    def _nothing_only_with_echo(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v == 0 and not info.data.get("echo"):
            raise ValueError("max_tokens 0 needs echo: true (the prompt is then all there is)")
        return v

    def logprobs_k(self) -> int | None:
        return self.logprobs


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None  # only an assistant turn may leave it out (OpenAI's rule)

    @model_validator(mode="after")
    def _content_unless_assistant(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a '{self.role}' message needs 'content'")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


# More messages than any context holds (each costs a chat template at least a token, and 64k is
# past every model here): refused while parsing, before they cost the pod's event loop anything.
MAX_MESSAGES = 65_536


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: StrictBool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    prediction: Any = None
    audio: Any = None
    modalities: Any = None
    NEUTRAL = {
        "tools": (None, []), "tool_choice": (None, "none", "auto"), "functions": (None, []),
        "function_call": (None, "none", "auto"), "prediction": (None,), "audio": (None,),
        "modalities": (None, ["text"]),
    }

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return v

    def logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @field_validator("messages", mode="before")
    @classmethod
    def _count_first(cls, v: object) -> object:
        # pydantic checks max_length after validating every item (200k messages: seconds)
        if isinstance(v, list) and len(v) > MAX_MESSAGES:
            raise ValueError(f"at most {MAX_MESSAGES} messages, got {len(v)}")
        return v


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None,
               extra: Mapping[str, object] | None = None) -> dict[str, object]:
    """OpenAI's error shape; ``extra`` adds fields a caller can act on (they never replace these)."""
    return {"error": {**(extra or {}), "message": message, "type": type_, "param": param, "code": code}}
