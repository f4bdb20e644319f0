"""`slinfer` command line. `slinfer serve` runs one runtime process (the OpenAI-compatible API)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import secrets
import sys
from dataclasses import dataclass
from typing import Any

from functions import Dtype, FunctionSpec, SpecError, load_function_dir, load_function_spec
from functions.http import MAX_REQUEST_BYTES, READ_TIMEOUT_S, http_protocol
from runtime.core.arbiter import MAX_PREFILL_STEP_S, DeviceKind
from runtime.host_memory import MemoryReading, read_memory
from runtime.pod import PodConfig


@dataclass(frozen=True)
class ServeSettings:
    functions: tuple[FunctionSpec, ...]
    host: str
    port: int
    pod: PodConfig
    threads: int | None
    admin_token: str
    max_request_bytes: int = MAX_REQUEST_BYTES
    read_timeout_s: float = READ_TIMEOUT_S


def _served_name(ref: str) -> str:
    if ref.startswith(("bundled:", "random:")):
        return ref.split(":", 1)[1].split("?", 1)[0]
    return ref.rstrip("/").rsplit("/", 1)[-1].removesuffix(".gguf").lower()


def parse_serve(argv: list[str], env: dict[str, str] | None = None) -> ServeSettings:
    env = dict(os.environ) if env is None else env
    ap = argparse.ArgumentParser(prog="slinfer serve", description="Run a runtime pod: several functions share one device.")
    ap.add_argument("--model", action="append", default=[],
                    help="model reference: bundled:<name>, random:<preset>[?seed=N], HF folder or .gguf "
                         "(repeatable; served under --name or a name derived from the reference)")
    ap.add_argument("--name", action="append", default=[], help="served name for the matching --model")
    ap.add_argument("--dtype", choices=[d.value for d in Dtype], default=Dtype.FLOAT32.value,
                    help="what --model instances compute in (weights, activations, KV); bfloat16 halves "
                         "their memory and is faster on CPUs with bf16 instructions (a function file sets "
                         "its own dtype)")
    ap.add_argument("--function", action="append", default=[], help="serve a FunctionSpec YAML file (repeatable)")
    ap.add_argument("--functions-dir", help="serve every FunctionSpec YAML in this folder")
    ap.add_argument("--no-functions", action="store_true",
                    help="start with nothing loaded (an autoscaler loads functions through /admin)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--device", choices=[k.value for k in DeviceKind], default="cpu")
    ap.add_argument("--kv-budget-mb", type=int, default=1024, help="KV memory shared by all instances (MiB)")
    ap.add_argument("--weight-cache-mb", type=int, default=4096, help="host cache for unloaded weights (MiB)")
    ap.add_argument("--memory-limit-mb", type=int, default=0,
                    help="memory this pod may use in all (MiB): a load that would not fit, with the KV budget "
                         "kept free, is refused (507) rather than risking an OOM kill (0: the cgroup's limit "
                         "and the host's free memory)")
    ap.add_argument("--stall-timeout-s", type=float, default=PodConfig.stall_timeout_s,
                    help="/healthz answers 503 once the device thread has made no progress this long, so a "
                         "liveness probe restarts a stuck pod")
    ap.add_argument("--block-size", type=int, default=PodConfig.block_size,
                    help="tokens per KV block (also the unit of prefix caching: a shared prefix is reused in whole blocks)")
    ap.add_argument("--max-num-seqs", type=int, default=32, help="requests per batch")
    ap.add_argument("--max-batched-tokens", type=int, default=512,
                    help="tokens per iteration; longer prompts are prefilled in chunks")
    ap.add_argument("--max-prefill-step-ms", type=float, default=MAX_PREFILL_STEP_S * 1000,
                    help="longest estimated step carrying a prefill chunk, so a new request never waits "
                         "behind a long prompt's whole chunk (ms; 0 = no cap)")
    ap.add_argument("--no-displace", dest="displace", action="store_false",
                    help="admission never hands a waiting prompt back (finish_reason \"preempted\", with its "
                         "continuation) to take a shorter one that would otherwise be refused")
    ap.add_argument("--no-newcomer-slack", dest="newcomer_slack", action="store_false",
                    help="admission plans a new request's first token against the 5%%-tighter deadline it "
                         "plans admitted work against, rather than against the request's SLO")
    ap.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                    help="every request computes its whole prompt (no KV shared between requests)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--shutdown-drain-s", type=float, default=PodConfig.shutdown_drain_s,
                    help="on SIGTERM, how long running requests may finish here before the rest are handed "
                         "off (continued on other pods by the activator)")
    ap.add_argument("--max-request-mb", type=float, default=MAX_REQUEST_BYTES / (1 << 20),
                    help="largest request body accepted, MiB (413 above it; 0: no limit)")
    ap.add_argument("--read-timeout-s", type=float, default=READ_TIMEOUT_S,
                    help="longest a request's headers, or the next part of its body, may take to arrive "
                         "(408 past it; 0: no limit)")
    ap.add_argument("--admin-token", default=env.get("SLINFER_ADMIN_TOKEN"),
                    help="bearer token for /admin (default: $SLINFER_ADMIN_TOKEN, else a random one, printed)")
    a = ap.parse_args(argv)
    specs: list[FunctionSpec] = []
    for i, ref in enumerate(a.model):
        specs.append(FunctionSpec(name=a.name[i] if i < len(a.name) else _served_name(ref), model=ref,
                                  max_output_tokens=4095, max_context_tokens=4096, dtype=Dtype(a.dtype)))
    try:
        specs += [load_function_spec(p) for p in a.function]
        if a.functions_dir:
            specs += load_function_dir(a.functions_dir)
    except (SpecError, OSError) as e:
        ap.error(str(e))
    if not specs and not a.no_functions:
        specs.append(FunctionSpec(name="smollm2-135m-instruct", model="bundled:smollm2-135m-instruct",
                                  max_output_tokens=4095, max_context_tokens=4096, dtype=Dtype(a.dtype)))
    if not a.stall_timeout_s > 0:
        ap.error(f"--stall-timeout-s must be > 0, got {a.stall_timeout_s}")
    if a.memory_limit_mb < 0:
        ap.error(f"--memory-limit-mb must be >= 0, got {a.memory_limit_mb}")
    if not a.max_prefill_step_ms >= 0:
        ap.error(f"--max-prefill-step-ms must be >= 0, got {a.max_prefill_step_ms}")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        ap.error(f"function names must be unique, got {names}")
    pod = PodConfig(device=DeviceKind(a.device), kv_budget_bytes=a.kv_budget_mb << 20,
                    weight_cache_bytes=a.weight_cache_mb << 20, block_size=a.block_size,
                    max_num_seqs=a.max_num_seqs, max_num_batched_tokens=a.max_batched_tokens,
                    max_prefill_step_s=a.max_prefill_step_ms / 1000 if a.max_prefill_step_ms > 0 else math.inf,
                    displace=a.displace, newcomer_slack=a.newcomer_slack, shutdown_drain_s=a.shutdown_drain_s,
                    prefix_caching=a.prefix_caching,
                    memory_limit_bytes=a.memory_limit_mb << 20 if a.memory_limit_mb > 0 else None,
                    stall_timeout_s=a.stall_timeout_s)
    token = a.admin_token or secrets.token_urlsafe(24)
    if not a.max_request_mb >= 0:
        ap.error(f"--max-request-mb must be >= 0, got {a.max_request_mb}")
    if not a.shutdown_drain_s >= 0:
        ap.error(f"--shutdown-drain-s must be >= 0, got {a.shutdown_drain_s}")
    if not a.read_timeout_s >= 0:
        ap.error(f"--read-timeout-s must be >= 0, got {a.read_timeout_s}")
    return ServeSettings(tuple(specs), a.host, a.port, pod, a.threads, token, int(a.max_request_mb * (1 << 20)),
                         a.read_timeout_s)


def kv_budget_refusal(kv_budget_bytes: int, memory: MemoryReading) -> str | None:
    """Why a pod must not start with this KV budget, or None: KV grows up to the budget while the
    pod serves, so a budget past the memory it has would end in an OOM kill under load."""
    if kv_budget_bytes <= memory.available_bytes:
        return None
    mib = 1 << 20
    return (f"--kv-budget-mb {kv_budget_bytes // mib} is more than the {memory.available_bytes // mib} MiB "
            f"this pod has free ({memory.source}); lower it, or give the pod more memory")


def serve(settings: ServeSettings) -> None:
    import torch
    import uvicorn

    from runtime.pod import Pod
    from runtime.server.app import create_app

    if settings.threads:
        torch.set_num_threads(settings.threads)
    if (why := kv_budget_refusal(settings.pod.kv_budget_bytes, read_memory(settings.pod.memory_limit_bytes))):
        sys.exit(f"slinfer serve: {why}")
    pod = Pod(settings.pod)
    app = create_app(pod, admin_token=settings.admin_token, functions=list(settings.functions),
                     max_request_bytes=settings.max_request_bytes, read_timeout_s=settings.read_timeout_s)
    base = f"http://{settings.host}:{settings.port}"
    first = settings.functions[0].name if settings.functions else "<function>"
    print(f"[slinfer] loading {', '.join(s.name for s in settings.functions)}; then serving the OpenAI API at "
          f"{base}/v1 with model = function name\n"
          f"[slinfer] try: curl {base}/v1/chat/completions -H 'Content-Type: application/json' "
          f"-d '{{\"model\": \"{first}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hi\"}}]}}'\n"
          f"[slinfer] admin API: {base}/admin (Authorization: Bearer {settings.admin_token})",
          file=sys.stderr, flush=True)
    class Server(uvicorn.Server):
        async def shutdown(self, sockets: list[Any] | None = None) -> None:
            # SIGTERM/SIGINT: running requests finish or leave with continuations before uvicorn
            # waits for open responses to end (a long stream would run on, then break at SIGKILL)
            logging.getLogger("slinfer.pod").info(
                "shutting down: running requests may finish for up to %g s, then move to other pods "
                "(Ctrl-C again: at once)", pod.config.shutdown_drain_s)
            handing = asyncio.ensure_future(pod.hand_off())
            while not handing.done():
                if self.force_exit:  # a second Ctrl-C: no more waiting for requests to finish
                    pod.end_drains()
                await asyncio.wait({handing}, timeout=0.1)
            moved = handing.result()
            if moved:
                logging.getLogger("slinfer.pod").info("shutting down: handed off %d running requests", moved)
            await super().shutdown(sockets)

    Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info",
                          http=http_protocol(settings.read_timeout_s))).run()


MESH_COMMANDS = ("up", "deploy", "delete", "list", "invoke", "logs")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: slinfer serve|simulate|up|deploy|delete|list|invoke|logs [options]   (slinfer <command> --help)")
        sys.exit(0 if argv else 2)
    cmd, rest = argv[0], argv[1:]
    if cmd == "serve":
        serve(parse_serve(rest))
    elif cmd == "simulate":
        from autoscaler.sim.cli import main as simulate_main

        sys.exit(simulate_main(rest))
    elif cmd in MESH_COMMANDS:  # the embedded mesh and the commands that talk to it
        from autoscaler.service.cli import run_command

        run_command(cmd, rest)
    else:
        print(f"slinfer: unknown command {cmd!r}; available: serve, simulate, {', '.join(MESH_COMMANDS)}",
              file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
