"""The function model: ``FunctionSpec`` and its YAML loaders. See ``functions.spec``."""

from pathlib import Path

from functions.spec import (
    SLO,
    DevicePreference,
    Dtype,
    FunctionSpec,
    SloOutcome,
    SpecError,
    checkpoint_key,
    load_function_dir,
    load_function_spec,
    parse_duration_s,
    parse_function_spec,
)

# The example functions shipped with the package (chat, classify, summarize, tiny-echo).
EXAMPLES_DIR = Path(__file__).parent / "examples"

# Activator -> runtime pod: seconds a request already spent before it reached the pod (held while
# instances refused it, or served on an instance that was preempted; waits for a model load left
# out). The pod's SLO deadlines for it keep counting from its arrival (runtime.device.DeviceLoop.anchor).
ELAPSED_HEADER = "slinfer-elapsed-s"
# With it, for a continued stream: how long ago the stream's first token came (its later tokens are
# due TPOT apart from it; the runtime reports it in a continuation as ``first_token_age_s``).
FIRST_TOKEN_AGE_HEADER = "slinfer-first-token-age-s"
# Activator -> runtime pod, on a streamed request: "1" asks the pod to start each SSE event with a
# comment line, STREAM_NOTE + one JSON object: "token_ids" (the output ids produced since the
# previous event, held-back text included), on the first event also "prompt_token_ids" and
# "max_tokens", and "finish_reason" once generation has ended. With it the activator can continue
# the stream on another instance if this pod dies mid-stream. SSE clients ignore comment lines;
# the activator strips them anyway.
TOKEN_IDS_HEADER = "slinfer-token-ids"
STREAM_NOTE = ": slinfer "

__all__ = [
    "ELAPSED_HEADER",
    "EXAMPLES_DIR",
    "FIRST_TOKEN_AGE_HEADER",
    "SLO",
    "SloOutcome",
    "DevicePreference",
    "Dtype",
    "FunctionSpec",
    "STREAM_NOTE",
    "SpecError",
    "TOKEN_IDS_HEADER",
    "checkpoint_key",
    "load_function_dir",
    "load_function_spec",
    "parse_duration_s",
    "parse_function_spec",
]
