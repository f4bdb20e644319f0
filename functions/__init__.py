"""The function model: ``FunctionSpec`` and its YAML loaders. See ``functions.spec``."""

from pathlib import Path

from functions.spec import (
    SLO,
    DevicePreference,
    FunctionSpec,
    SpecError,
    load_function_dir,
    load_function_spec,
    parse_duration_s,
    parse_function_spec,
)

# The example functions shipped with the package (chat, summarize, tiny-echo).
EXAMPLES_DIR = Path(__file__).parent / "examples"

# Activator -> runtime pod: seconds a request already spent before it reached the pod (held while
# instances refused it, or served on an instance that was preempted; waits for a model load left
# out). The pod's SLO deadlines for it keep counting from its arrival (runtime.device.DeviceLoop.anchor).
ELAPSED_HEADER = "slinfer-elapsed-s"

__all__ = [
    "ELAPSED_HEADER",
    "EXAMPLES_DIR",
    "SLO",
    "DevicePreference",
    "FunctionSpec",
    "SpecError",
    "load_function_dir",
    "load_function_spec",
    "parse_duration_s",
    "parse_function_spec",
]
