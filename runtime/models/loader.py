"""Model references -> loaded model + tokenizer.

Reference forms (the `model` field of a FunctionSpec):
  bundled:<name>            the bundled default, fetched and cached on first use
  random:<preset>[?seed=N]  seeded random weights of a known shape, byte tokenizer (for tests)
  /path/to/hf-folder        config.json + *.safetensors (+ tokenizer files)
  /path/to/model.gguf       dequantized once into the cache, then loaded from there
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import torch
from safetensors import safe_open

from functions import Dtype
from runtime.models.bundled import cache_root, convert_gguf, ensure_bundled
from runtime.models.config import ModelConfig
from runtime.models.llama import LlamaModel
from runtime.models.tokenizer import BYTE_VOCAB_SIZE, byte_tokenizer, load_tokenizer


class ModelLoadError(ValueError):
    pass


SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed takes


# Shapes of the random-weight presets, as HF config dicts (so HF can build the same model).
RANDOM_PRESETS: dict[str, dict[str, Any]] = {
    "llama-tiny": {
        "model_type": "llama", "vocab_size": 320, "hidden_size": 256, "intermediate_size": 704,
        "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 4096,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
    },
    "qwen2-tiny": {
        "model_type": "qwen2", "vocab_size": 320, "hidden_size": 256, "intermediate_size": 704,
        "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 4096,
        "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
    },
    # SmolLM2-135M's shape, for capacity tests without the download.
    "smollm2-shape": {
        "model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "max_position_embeddings": 8192,
        "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
    },
}


@dataclass
class LoadedModel:
    ref: str
    config: ModelConfig
    hf_config: dict[str, Any]
    model: LlamaModel
    tokenizer: Any
    folder: Path | None  # where the weights came from (None for random)
    load_s: float


def weight_shapes(hf_config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor of an HF Llama/Qwen2 checkpoint of this shape, by name, in the order
    ``random_weights`` draws them."""
    c = ModelConfig.from_hf(hf_config)
    qd, kvd, h, i = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.hidden_size, c.intermediate_size
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c.vocab_size, h)}
    for li in range(c.num_layers):
        p = f"model.layers.{li}."
        out[p + "input_layernorm.weight"] = (h,)
        out[p + "post_attention_layernorm.weight"] = (h,)
        out[p + "self_attn.q_proj.weight"] = (qd, h)
        out[p + "self_attn.k_proj.weight"] = (kvd, h)
        out[p + "self_attn.v_proj.weight"] = (kvd, h)
        out[p + "self_attn.o_proj.weight"] = (h, qd)
        if c.attention_bias:
            for n, d in (("q", qd), ("k", kvd), ("v", kvd)):
                out[p + f"self_attn.{n}_proj.bias"] = (d,)
        out[p + "mlp.gate_proj.weight"] = (i, h)
        out[p + "mlp.up_proj.weight"] = (i, h)
        out[p + "mlp.down_proj.weight"] = (h, i)
    out["model.norm.weight"] = (h,)
    if not c.tie_word_embeddings:
        out["lm_head.weight"] = (c.vocab_size, h)
    return out


def random_weights(hf_config: dict[str, Any], seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Seeded weights with HF Llama/Qwen2 names, drawn in float32 and cast one by one to ``dtype``
    (the same values as casting the whole float32 set, without holding it). Std 0.1 (not HF's
    0.02) so logits are peaked enough that greedy decoding is not decided by float noise; the
    embedding's std is 1, the head's 0.5, norms are ones and biases have std 0.02."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, shape in weight_shapes(hf_config).items():
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            w = torch.ones(*shape)
        else:
            std = 1.0 if name == "model.embed_tokens.weight" else 0.5 if name == "lm_head.weight" else \
                0.02 if name.endswith(".bias") else 0.1
            w = torch.randn(*shape, generator=g) * std
        out[name] = w.to(dtype)
    return out


def parse_random_ref(ref: str) -> tuple[str, int]:
    body = ref[len("random:"):]
    preset, _, query = body.partition("?")
    if preset not in RANDOM_PRESETS:
        raise ModelLoadError(f"unknown random preset {preset!r}; available: {', '.join(sorted(RANDOM_PRESETS))}")
    q = parse_qs(query, keep_blank_values=True)
    if unknown := sorted(set(q) - {"seed"}):
        raise ModelLoadError(f"unknown option {unknown[0]!r} in {ref!r}; the only one is seed=N")
    seeds = q.get("seed", ["0"])
    try:
        seed = int(seeds[-1])
    except ValueError as e:
        raise ModelLoadError(f"seed must be an integer in {ref!r}") from e
    if len(seeds) > 1 or not SEED_MIN <= seed <= SEED_MAX:  # torch.Generator.manual_seed's range
        raise ModelLoadError(f"seed must be one integer in [{SEED_MIN}, {SEED_MAX}] in {ref!r}")
    return preset, seed


def resolve_folder(ref: str) -> Path:
    """The HF folder a non-random reference loads from (fetching/converting if needed)."""
    if ref.startswith("bundled:"):
        return ensure_bundled(ref[len("bundled:"):])
    path = Path(ref).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        out = gguf_folder(path)
        if not (out / "config.json").exists():
            convert_gguf(path, out)
        return out
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{path}: not a model folder (no config.json)")
        return path
    raise ModelLoadError(
        f"model {ref!r} not found: expected bundled:<name>, random:<preset>, an HF folder or a .gguf file"
    )


def gguf_folder(path: Path) -> Path:
    """Where the HF copy of a GGUF file is cached (named by the file's path, size and mtime)."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{path.stem}-{key}"


def load_state_dict(folder: Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors in ``dtype``, read and converted one tensor at a time: a load
    holds the converted model plus one tensor as stored, never a whole file in two dtypes."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder}: no *.safetensors files")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():  # noqa: SIM118 (safe_open is not iterable)
                weights[k] = h.get_tensor(k).to(dtype)
    return weights


# activations and KV; int8 keeps the linear layers' weights in int8 (runtime.models.llama.Int8Linear)
TORCH_DTYPES = {Dtype.FLOAT32: torch.float32, Dtype.BFLOAT16: torch.bfloat16, Dtype.INT8: torch.bfloat16}


@dataclass(frozen=True)
class LoadEstimate:
    """What loading a model takes in host memory: ``weight_bytes`` stays (the model, as the
    weight cache counts it); ``peak_bytes`` is the most the load holds at once, with a margin."""

    weight_bytes: int
    peak_bytes: int


_LINEARS = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
            "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")
# The load's transient copies beyond the state dict are estimated, not traced; measured on
# SmolLM2-135M (float32 / bfloat16 / int8, from its float32 file and from random weights), this
# margin keeps the estimate above the measured peak of anonymous memory.
_PEAK_FACTOR, _PEAK_SLACK_BYTES = 1.2, 64 << 20


def estimate_load(ref: str, dtype: Dtype = Dtype.FLOAT32) -> LoadEstimate:
    """The memory ``load_model(ref, dtype)`` will take, from the checkpoint's config and its
    safetensors headers, without reading a weight (a bundled model is fetched first, as the load
    would; a GGUF file not yet converted is estimated from its header, conversion included)."""
    path = Path(ref).expanduser()
    if ref.startswith("random:"):
        hf_config = RANDOM_PRESETS[parse_random_ref(ref)[0]]
        stored = {k: (shape, torch.float32) for k, shape in weight_shapes(hf_config).items()}  # drawn in float32
    elif path.is_file() and path.suffix == ".gguf" and not (gguf_folder(path) / "config.json").exists():
        return _unconverted_gguf_estimate(path, dtype)
    else:
        folder = resolve_folder(ref)
        hf_config = json.loads((folder / "config.json").read_text())
        stored = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():  # noqa: SIM118 (safe_open is not iterable)
                    sl = h.get_slice(k)
                    stored[k] = (tuple(sl.get_shape()), _SAFETENSORS_DTYPES.get(sl.get_dtype(), torch.float32))
    c = ModelConfig.from_hf(hf_config)
    compute = TORCH_DTYPES[dtype]
    size = compute.itemsize
    numel = math.prod

    taken = weight_shapes(hf_config)  # what the model keeps, fused or not
    rope = 2 * c.max_position * c.head_dim * size
    if dtype is Dtype.INT8:  # linear weights 1 byte + a scale per output row; the rest in compute
        linears = [s for k, s in taken.items() if k.endswith(_LINEARS) or k == "lm_head.weight"]
        if c.tie_word_embeddings:  # the head is an int8 copy of the embedding, which stays
            linears.append(taken["model.embed_tokens.weight"])
        weight = (sum(numel(s) for k, s in taken.items() if not (k.endswith(_LINEARS) or k == "lm_head.weight"))
                  * size + sum(numel(s) + s[0] * size for s in linears))
    else:
        weight = sum(numel(s) for s in taken.values()) * size
    weight += rope
    state_dict = sum(numel(s) for s, _ in stored.values()) * size + rope
    p = "model.layers.0."
    fused = max(numel(taken[p + n]) for n in ("mlp.gate_proj.weight", "self_attn.q_proj.weight")) * 2 * size \
        if c.num_layers else 0  # a cat copy (q/k/v or gate/up) held beside its parts
    raw = max((numel(s) * d.itemsize for s, d in stored.values()), default=0)
    peak = int((max(weight, state_dict) + fused + raw) * _PEAK_FACTOR) + _PEAK_SLACK_BYTES
    return LoadEstimate(weight, peak)


# Converting a GGUF file dequantizes the whole model to float32 in transformers, then copies it
# out: measured 1.55x the float32 size at its peak (SmolLM2-135M, Q4_1).
_GGUF_CONVERSION_FACTOR = 2.0


def _unconverted_gguf_estimate(path: Path, dtype: Dtype) -> LoadEstimate:
    """From the GGUF header alone (its tensors' element counts): the conversion's peak, or the
    load's if larger; the loaded size is approximate (every weight at the compute dtype's size,
    an upper bound for int8), exact once the converted copy exists."""
    from gguf import GGUFReader

    params = sum(int(t.n_elements) for t in GGUFReader(str(path)).tensors)
    weight = params * TORCH_DTYPES[dtype].itemsize
    conversion = int(params * 4 * _GGUF_CONVERSION_FACTOR)
    load = int((weight + params * 4) * _PEAK_FACTOR)  # the float32 copy read while converting
    return LoadEstimate(weight, max(conversion, load) + _PEAK_SLACK_BYTES)


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                       "I8": torch.int8, "U8": torch.uint8, "I32": torch.int32, "I64": torch.int64}


def load_model(ref: str, dtype: Dtype = Dtype.FLOAT32) -> LoadedModel:
    """The model ``ref`` names, computing in ``dtype`` (see ``functions.Dtype``)."""
    t0 = time.monotonic()
    if ref.startswith("random:"):
        preset, seed = parse_random_ref(ref)
        hf_config = dict(RANDOM_PRESETS[preset])
        config = ModelConfig.from_hf(hf_config)
        weights = random_weights(hf_config, seed, TORCH_DTYPES[dtype])
        tok = byte_tokenizer()
        if config.vocab_size < BYTE_VOCAB_SIZE:
            raise ModelLoadError(f"preset {preset} vocab is smaller than the byte tokenizer's")
        folder = None
    else:
        folder = resolve_folder(ref)
        hf_config = json.loads((folder / "config.json").read_text())
        config = ModelConfig.from_hf(hf_config)
        weights = load_state_dict(folder, TORCH_DTYPES[dtype])
        tok = load_tokenizer(folder)
    model = LlamaModel(config, weights, TORCH_DTYPES[dtype], int8_weights=dtype is Dtype.INT8)  # consumes weights
    return LoadedModel(ref, config, hf_config, model, tok, folder, time.monotonic() - t0)
