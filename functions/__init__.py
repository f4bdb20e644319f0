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

__all__ = [
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
