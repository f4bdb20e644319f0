"""`slinfer` command line. `slinfer serve` runs one runtime process (the OpenAI-compatible API)."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass

from runtime.engine.engine import EngineConfig


@dataclass(frozen=True)
class ServeSettings:
    models: tuple[tuple[str, str, str | None, int | None], ...]  # (name, ref, system prompt, max context)
    host: str
    port: int
    engine: EngineConfig
    threads: int | None


def _served_name(ref: str) -> str:
    if ref.startswith(("bundled:", "random:")):
        return ref.split(":", 1)[1].split("?", 1)[0]
    return ref.rstrip("/").rsplit("/", 1)[-1].removesuffix(".gguf")


def parse_serve(argv: list[str]) -> ServeSettings:
    ap = argparse.ArgumentParser(prog="slinfer serve", description="Run a runtime process serving models.")
    ap.add_argument("--model", action="append", default=[],
                    help="model reference: bundled:<name>, random:<preset>[?seed=N], HF folder or .gguf "
                         "(repeatable; served under --name or a name derived from the reference)")
    ap.add_argument("--name", action="append", default=[], help="served model name for the matching --model")
    ap.add_argument("--function", action="append", default=[], help="serve a FunctionSpec YAML file")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--kv-cache-mb", type=int, default=256, help="KV cache memory per model (MiB)")
    ap.add_argument("--block-size", type=int, default=32, help="tokens per KV block")
    ap.add_argument("--max-num-seqs", type=int, default=32, help="requests per batch")
    ap.add_argument("--max-batched-tokens", type=int, default=512,
                    help="tokens per iteration; longer prompts are prefilled in chunks")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    a = ap.parse_args(argv)
    models: list[tuple[str, str, str | None, int | None]] = []
    for i, ref in enumerate(a.model):
        models.append((a.name[i] if i < len(a.name) else _served_name(ref), ref, None, None))
    if a.function:
        from functions import load_function_spec

        for path in a.function:
            spec = load_function_spec(path)
            models.append((spec.name, spec.model, spec.system_prompt, spec.max_context_tokens))
    if not models:
        models.append(("smollm2-135m-instruct", "bundled:smollm2-135m-instruct", None, None))
    names = [m[0] for m in models]
    if len(set(names)) != len(names):
        ap.error(f"served names must be unique, got {names}")
    engine = EngineConfig(block_size=a.block_size, kv_cache_bytes=a.kv_cache_mb * 1024 * 1024,
                          max_num_seqs=a.max_num_seqs, max_num_batched_tokens=a.max_batched_tokens)
    return ServeSettings(tuple(models), a.host, a.port, engine, a.threads)


def serve(settings: ServeSettings) -> None:
    import dataclasses

    import torch
    import uvicorn

    from runtime.engine.async_engine import AsyncEngine
    from runtime.engine.engine import LLMEngine
    from runtime.models.loader import load_model
    from runtime.server.app import ServedModel, create_app

    if settings.threads:
        torch.set_num_threads(settings.threads)
    served = []
    for name, ref, system_prompt, max_ctx in settings.models:
        t0 = time.monotonic()
        loaded = load_model(ref)
        cfg = dataclasses.replace(settings.engine, max_model_len=max_ctx) if max_ctx else settings.engine
        eng = LLMEngine(loaded, cfg)
        print(f"[slinfer] loaded {name} ({ref}) in {time.monotonic() - t0:.2f}s: "
              f"{loaded.model.num_params / 1e6:.0f}M params, {eng.kv_blocks_total} KV blocks of "
              f"{cfg.block_size} tokens, context {eng.max_model_len}", file=sys.stderr, flush=True)
        served.append(ServedModel(name, AsyncEngine(eng), system_prompt, int(time.time())))
    app = create_app(served)
    base = f"http://{settings.host}:{settings.port}"
    print(f"[slinfer] serving {', '.join(s.name for s in served)} at {base}/v1 "
          f"(try: curl {base}/v1/chat/completions -H 'Content-Type: application/json' "
          f"-d '{{\"model\": \"{served[0].name}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hi\"}}]}}')",
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: slinfer serve [options]   (slinfer serve --help for options)")
        sys.exit(0 if argv else 2)
    cmd, rest = argv[0], argv[1:]
    if cmd == "serve":
        serve(parse_serve(rest))
    else:
        print(f"slinfer: unknown command {cmd!r}; available: serve", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
