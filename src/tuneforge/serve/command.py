"""`tuneforge serve`: one base model, many adapters, an OpenAI-compatible HTTP API.

    tuneforge serve --model smollm2-135m --adapters-dir adapters/ --port 8000
    tuneforge serve --adapters-dir adapters/ --quantize nf4    # QLoRA adapters on the 4-bit base they trained on
    tuneforge serve --state-dir serve-state/ --admin-key K     # + OpenAI fine-tuning jobs, co-served (serve/finetune/)
    curl localhost:8000/v1/completions -d '{"model": "my-adapter", "prompt": "Hi", "max_tokens": 16}'

Every subdirectory of --adapters-dir holding a PEFT-format adapter is a model the API serves under
the subdirectory's name; the base model answers to --served-model-name (default: --model).
"""

from __future__ import annotations

import argparse
import os
import sys

from tuneforge.errors import ConfigError
from tuneforge.models import DTYPE_CHOICES, load_model
from tuneforge.models.placement import parse_device
from tuneforge.quant.presets import QUANTIZE_CHOICES, quantization_settings
from tuneforge.serve.guard import CHARS_PER_TOKEN_BOUND, ServeLimits

DEFAULT_MODEL = "smollm2-135m"
API_KEY_VARIABLE = "TUNEFORGE_API_KEY"
ADMIN_KEY_VARIABLE = "TUNEFORGE_ADMIN_KEY"


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"base model: embedded name, local path or hub id (default {DEFAULT_MODEL})")
    parser.add_argument("--adapters-dir", default=None, metavar="DIR", help="folder whose subfolders are adapters, served by folder name")
    parser.add_argument("--served-model-name", default=None, metavar="NAME", help="the base model's name in the API (default: --model)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--api-key", default=None, metavar="KEY",
                        help=f"require 'Authorization: Bearer KEY' on every route but /health (default: ${API_KEY_VARIABLE} if set)")
    parser.add_argument("--admin-key", default=None, metavar="KEY",
                        help=f"key for the adapter load/unload/pin routes (default: ${ADMIN_KEY_VARIABLE}, else the API key)")
    parser.add_argument("--max-body-bytes", type=int, default=ServeLimits.max_body_bytes, metavar="N",
                        help=f"largest request body; larger ones get 413 (default {ServeLimits.max_body_bytes})")
    parser.add_argument("--max-messages", type=int, default=ServeLimits.max_messages, metavar="N",
                        help=f"most messages in one chat request (default {ServeLimits.max_messages})")
    parser.add_argument("--max-prompt-chars", type=int, default=None, metavar="N",
                        help=f"longest prompt in characters, refused before rendering (default {CHARS_PER_TOKEN_BOUND} x --max-model-len)")
    parser.add_argument("--max-batch-size", type=int, default=8, metavar="N", help="most requests decoded together (default 8)")
    parser.add_argument("--max-loaded-adapters", type=int, default=8, metavar="N", help="adapters kept in memory, LRU (default 8)")
    parser.add_argument("--max-queue", type=int, default=64, metavar="N", help="most requests waiting; beyond it the API answers 429 (default 64)")
    parser.add_argument("--max-model-len", type=int, default=None, metavar="N", help="longest prompt + reply in tokens (default: the model's, at most 2048)")
    parser.add_argument("--request-timeout", type=float, default=600.0, metavar="S", help="seconds before a request fails with 503 (default 600)")
    parser.add_argument("--state-dir", default=None, metavar="DIR",
                        help="enable the fine-tuning API (/v1/files, /v1/fine_tuning/jobs): uploads, jobs and fine-tuned "
                             "models are kept here and listed again after a restart")
    parser.add_argument("--finetune-share", type=float, default=0.5, metavar="S",
                        help="fraction of step time a fine-tuning job may take while requests are served, in (0, 1] (default 0.5)")
    parser.add_argument("--finetune-slo-queue", type=int, default=None, metavar="N",
                        help="SLO mode: a job pauses while more than N requests wait (default: off)")
    parser.add_argument("--dtype", default="auto", choices=list(DTYPE_CHOICES), help="dtype of the base weights (default auto)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default auto)")
    parser.add_argument("--quantize", default=None, choices=QUANTIZE_CHOICES,
                        help="load the base quantized, as QLoRA adapters were trained (float32 compute on CPU, "
                             "bfloat16 on GPU)")


def serve_keys(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """(API key, admin key) from the flags, else the environment; an empty one is an error, never
    'no key' (it used to turn authentication off without a word)."""
    keys = []
    for flag, value, variable in (("--api-key", args.api_key, API_KEY_VARIABLE),
                                  ("--admin-key", args.admin_key, ADMIN_KEY_VARIABLE)):
        source = flag
        if value is None and variable in os.environ:
            value, source = os.environ[variable], f"${variable}"
        if value is not None and not value.strip():
            raise ConfigError(f"{source} is empty, which would leave the server open to anyone; give a non-empty "
                              f"key, or {'unset it' if source.startswith('$') else 'leave the flag out'} to serve "
                              "without one (fine on 127.0.0.1 only)")
        keys.append(value)
    return keys[0], keys[1]


def check_serve_arguments(args: argparse.Namespace) -> None:
    serve_keys(args)
    for flag in ("max_batch_size", "max_loaded_adapters", "max_queue", "max_body_bytes", "max_messages"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be a positive integer")
    if args.max_prompt_chars is not None and args.max_prompt_chars < 1:
        raise ConfigError(f"--max-prompt-chars {args.max_prompt_chars} must be a positive integer")
    if args.max_model_len is not None and args.max_model_len < 2:
        raise ConfigError(f"--max-model-len {args.max_model_len} must be at least 2")
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port {args.port} must be in 1..65535")
    if args.request_timeout <= 0:
        raise ConfigError(f"--request-timeout {args.request_timeout} must be positive")
    from tuneforge.serve.finetune.coserve import CoservePolicy

    CoservePolicy(args.finetune_share, args.finetune_slo_queue)  # refuses bad values before the slow load
    if args.state_dir is not None and os.path.exists(args.state_dir) and not os.path.isdir(args.state_dir):
        raise ConfigError(f"--state-dir {args.state_dir} is a file; point it to a directory (it is created if missing)")
    if args.adapters_dir is not None and not os.path.isdir(args.adapters_dir):
        raise ConfigError(f"--adapters-dir {args.adapters_dir} is not a directory; create it or point to the folder holding your adapters")


def build_app(args: argparse.Namespace):
    """Load the model and wire engine, adapter manager and API together (no server started)."""
    from tuneforge.serve.adapters import AdapterManager
    from tuneforge.serve.api import create_app
    from tuneforge.serve.engine import Engine

    check_serve_arguments(args)  # before the slow load
    quantization = quantization_settings(args.quantize, parse_device(args.device))
    loaded = load_model(args.model, dtype=args.dtype, device=args.device, quantization=quantization)
    wants_manager = args.adapters_dir or args.state_dir  # fine-tuned models are served as adapters
    manager = AdapterManager(loaded.model, args.adapters_dir, args.max_loaded_adapters) if wants_manager else None
    engine = Engine(loaded.model, loaded.tokenizer, adapters=manager, max_batch_size=args.max_batch_size,
                    max_queue=args.max_queue, max_model_len=args.max_model_len)
    model_name = args.served_model_name or args.model
    finetune = None
    if args.state_dir is not None:
        from tuneforge.serve.finetune.coserve import CoservePolicy
        from tuneforge.serve.finetune.jobs import FineTuningService

        finetune = FineTuningService(args.state_dir, engine, manager, model_name,
                                     CoservePolicy(args.finetune_share, args.finetune_slo_queue))
    api_key, admin_key = serve_keys(args)
    limits = ServeLimits(max_body_bytes=args.max_body_bytes, max_messages=args.max_messages,
                         max_prompt_chars=args.max_prompt_chars)
    return create_app(engine, manager, model_name, api_key=api_key, admin_key=admin_key,
                      request_timeout=args.request_timeout, limits=limits, finetune=finetune)


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    app = build_app(args)
    service = app.state.service
    adapters = service.adapters.available() if service.adapters is not None else []
    print(f"Serving {service.model_name} + {len(adapters)} adapter(s) at http://{args.host}:{args.port}/v1 "
          f"(OpenAI-compatible){' with an API key' if service.api_key else ''}", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
