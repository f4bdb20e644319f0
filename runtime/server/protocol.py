"""OpenAI-compatible request bodies (the subset we serve) and error shapes."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator

# Stop strings are matched against the text after every token of the request, on the device's
# thread: a few short ones is what they are for (OpenAI takes up to 4).
MAX_STOPS = 16
MAX_STOP_CHARS = 1024


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class _SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields we do not use (user, ...)

    model: str
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    n: Literal[1] = 1
    # Strict: "no" or "false" must not read as a boolean here and as truthy in the activator.
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: Annotated[int, Field(ge=-(2**63), lt=2**64)] | None = None  # what torch's generators take

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
    max_tokens: Annotated[int, Field(ge=1)] | None = 16
    # slinfer extension for continuing a preempted stream: the prompt is token ids (prompt +
    # output so far) and its last `resumed_tokens` ids are output the client already received.
    resumed_tokens: Annotated[int, Field(ge=0)] = 0


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

    @field_validator("messages", mode="before")
    @classmethod
    def _count_first(cls, v: object) -> object:
        # pydantic checks max_length after validating every item (200k messages: seconds)
        if isinstance(v, list) and len(v) > MAX_MESSAGES:
            raise ValueError(f"at most {MAX_MESSAGES} messages, got {len(v)}")
        return v


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict[str, object]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
