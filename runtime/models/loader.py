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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import torch
from safetensors.torch import load_file

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


def random_weights(hf_config: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """Seeded weights with HF Llama/Qwen2 names. Std 0.1 (not HF's 0.02) so logits are peaked
    enough that greedy decoding is not decided by float noise."""
    c = ModelConfig.from_hf(hf_config)
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, std: float = 0.1) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    w: dict[str, torch.Tensor] = {"model.embed_tokens.weight": rnd(c.vocab_size, c.hidden_size, std=1.0)}
    qd, kvd = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = torch.ones(c.hidden_size)
        w[p + "post_attention_layernorm.weight"] = torch.ones(c.hidden_size)
        w[p + "self_attn.q_proj.weight"] = rnd(qd, c.hidden_size)
        w[p + "self_attn.k_proj.weight"] = rnd(kvd, c.hidden_size)
        w[p + "self_attn.v_proj.weight"] = rnd(kvd, c.hidden_size)
        w[p + "self_attn.o_proj.weight"] = rnd(c.hidden_size, qd)
        if c.attention_bias:
            for n, d in (("q", qd), ("k", kvd), ("v", kvd)):
                w[p + f"self_attn.{n}_proj.bias"] = rnd(d, std=0.02)
        w[p + "mlp.gate_proj.weight"] = rnd(c.intermediate_size, c.hidden_size)
        w[p + "mlp.up_proj.weight"] = rnd(c.intermediate_size, c.hidden_size)
        w[p + "mlp.down_proj.weight"] = rnd(c.hidden_size, c.intermediate_size)
    w["model.norm.weight"] = torch.ones(c.hidden_size)
    if not c.tie_word_embeddings:
        w["lm_head.weight"] = rnd(c.vocab_size, c.hidden_size, std=0.5)
    return w


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
        st = path.stat()
        key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
        out = cache_root() / "gguf" / f"{path.stem}-{key}"
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


def load_state_dict(folder: Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors in ``dtype``, converted file by file (never all of it in two dtypes)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder}: no *.safetensors files")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        weights.update({k: v.to(dtype) for k, v in load_file(str(f)).items()})
    return weights


# activations and KV; int8 keeps the linear layers' weights in int8 (runtime.models.llama.Int8Linear)
TORCH_DTYPES = {Dtype.FLOAT32: torch.float32, Dtype.BFLOAT16: torch.bfloat16, Dtype.INT8: torch.bfloat16}


def load_model(ref: str, dtype: Dtype = Dtype.FLOAT32) -> LoadedModel:
    """The model ``ref`` names, computing in ``dtype`` (see ``functions.Dtype``)."""
    t0 = time.monotonic()
    if ref.startswith("random:"):
        preset, seed = parse_random_ref(ref)
        hf_config = dict(RANDOM_PRESETS[preset])
        config = ModelConfig.from_hf(hf_config)
        weights = random_weights(hf_config, seed)
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
    model = LlamaModel(config, weights, TORCH_DTYPES[dtype], int8_weights=dtype is Dtype.INT8)
    return LoadedModel(ref, config, hf_config, model, tok, folder, time.monotonic() - t0)
