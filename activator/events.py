"""CloudEvents in and out (``cloudevents`` 2.x core API), binary and structured HTTP mode.

An event's data becomes the prompt through the function's ``event_template``; the reply is a
CloudEvent with the function's ``event_type`` and ``event_source``, a fresh id, the time, and the
generated text as data (``text/plain``), sent back in the mode the request came in. Knative's
Broker puts a valid CloudEvent reply back on the Broker; an empty reply is fine too.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from enum import Enum

from cloudevents.core.base import BaseCloudEvent
from cloudevents.core.bindings.http import HTTPMessage, from_http_event, to_binary_event, to_structured_event
from cloudevents.core.v1.event import CloudEvent

from functions import FunctionSpec

STRUCTURED_TYPE = "application/cloudevents+json"


class Mode(Enum):
    BINARY = "binary"
    STRUCTURED = "structured"


class BadEvent(ValueError):
    """The request claims to be a CloudEvent but is not a valid one (400)."""


def event_mode(headers: Mapping[str, str]) -> Mode | None:
    """The CloudEvents HTTP mode of a request, or None when it is not a CloudEvent.
    ``headers`` keys are lower-case (as Starlette gives them)."""
    ctype = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if ctype == STRUCTURED_TYPE:
        return Mode.STRUCTURED
    if ctype == "application/cloudevents-batch+json":
        raise BadEvent("batched CloudEvents are not supported; send one event per request")
    if "ce-specversion" in headers:
        return Mode.BINARY
    return None


def parse_event(headers: Mapping[str, str], body: bytes) -> BaseCloudEvent:
    try:
        event = from_http_event(HTTPMessage(dict(headers), body))
    except Exception as e:  # the SDK raises several types (validation, JSON, attribute errors)
        raise BadEvent(f"not a valid CloudEvent: {e}") from e
    # The SDK makes up an id when the event has none; id is REQUIRED, and a made-up one would be
    # the reply's subject, answering an event nobody can name.
    doc = json.loads(body) if event_mode(headers) is Mode.STRUCTURED else None  # valid: the SDK parsed it
    if not _has_id(headers, doc):
        raise BadEvent("not a valid CloudEvent: the required attribute 'id' is missing")
    if isinstance(doc, dict) and "data_base64" in doc:  # the SDK decodes leniently: "!!!" became b""
        try:
            base64.b64decode(doc["data_base64"], validate=True)
        except (binascii.Error, TypeError, ValueError) as e:
            raise BadEvent(f"not a valid CloudEvent: data_base64 is not base64 ({e})") from e
    return event


def _has_id(headers: Mapping[str, str], doc: object) -> bool:
    if "ce-id" in headers:
        return bool(headers["ce-id"])
    return isinstance(doc, dict) and isinstance(doc.get("id"), str) and bool(doc["id"])


def event_text(event: BaseCloudEvent) -> str:
    """The event's data as prompt text: strings as they are, JSON values serialised, bytes as UTF-8."""
    data = event.get_data()
    if data is None:
        raise BadEvent(f"CloudEvent {event.get_id()!r} has no data to turn into a prompt")
    if isinstance(data, bytes):
        if not data:
            raise BadEvent(f"CloudEvent {event.get_id()!r} has no data to turn into a prompt")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadEvent(f"CloudEvent {event.get_id()!r}: data is not UTF-8 text") from e
    if isinstance(data, str):
        return data
    return json.dumps(data, ensure_ascii=False)


def reply_event(spec: FunctionSpec, text: str, request: BaseCloudEvent) -> CloudEvent:
    """The answer as a CloudEvent: text/plain, or, from a function with an ``output_schema``, the
    JSON value itself (application/json), so a downstream function's trigger can filter on it.
    ValueError if such a function's answer is not JSON (it was cut at max_output_tokens)."""
    attrs = {
        "specversion": "1.0",
        "id": uuid.uuid4().hex,
        "source": spec.event_source,
        "type": spec.event_type,
        "time": datetime.now(UTC),
        "subject": request.get_id(),  # which event this answers
        "datacontenttype": "text/plain; charset=utf-8",
    }
    if spec.output_schema is None:
        return CloudEvent(attrs, data=text)
    value = json.loads(text)  # ValueError (JSONDecodeError) when cut short
    return CloudEvent({**attrs, "datacontenttype": "application/json"}, data=value)


def encode(event: CloudEvent, mode: Mode) -> HTTPMessage:
    return to_binary_event(event) if mode is Mode.BINARY else to_structured_event(event)
