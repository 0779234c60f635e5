"""``tuneforge merge``, ``tuneforge export`` and ``tuneforge compress``: argument parsing and reporting only.

    tuneforge merge merge.yaml out/merged [--overwrite]
    tuneforge export --model smollm2-135m --adapter runs/a/adapter --output out/a-gguf --format gguf
    tuneforge compress runs/a/adapter out/a-small --density 0.1 --mixed-precision
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from tuneforge.errors import ConfigError
from tuneforge.merge.config import AdapterMergeConfig, FullMergeConfig, parse_merge_config
from tuneforge.merge.staging import check_new_output, staged_directory


def register_commands(commands, add_command) -> None:
    """Add the three subcommands through the CLI's own ``_add_command`` helper."""
    add_command(commands, "merge", "merge whole models or combine LoRA adapters, as a YAML config says",
                add_merge_arguments, run_merge)
    add_command(commands, "export", "merge an adapter into its base; write a transformers dir or a GGUF file",
                add_export_arguments, run_export)
    add_command(commands, "compress", "shrink a LoRA adapter (sparse ternary, ComPEFT-style; mixed precision)",
                add_compress_arguments, run_compress)


def add_merge_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="merge YAML: 'models:' (whole models) or 'adapters:' (LoRA adapters)")
    parser.add_argument("output", help="output directory (a model directory or a PEFT adapter directory)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")


def run_merge(args: argparse.Namespace) -> int:
    from tuneforge.config import load_config_file

    console = Console()
    config = parse_merge_config(load_config_file(args.config), source=args.config)
    check_new_output(args.output, args.overwrite)
    if isinstance(config, AdapterMergeConfig):
        path = merge_adapters_from_config(config, args.output, args.overwrite)
        console.print(f"combined {len(config.adapters)} adapters with '{config.method}' into {escape(str(path))}")
        return 0
    summary = merge_models_from_config(config, args.output, args.overwrite)
    console.print(f"merged {len(config.models)} models with '{config.merge_method}': {summary['tensors']} tensors, "
                  f"{summary['bytes'] / 1e6:.1f} MB in {', '.join(summary['shards'])} -> {escape(str(args.output))}")
    return 0


def merge_models_from_config(config: FullMergeConfig, output: str | Path, overwrite: bool = False) -> dict:
    from tuneforge.merge.full_model import merge_models

    with staged_directory(output, overwrite) as staging:
        return merge_models(config, staging)


def merge_adapters_from_config(config: AdapterMergeConfig, output: str | Path, overwrite: bool = False) -> Path:
    from tuneforge.merge.combine import combine_adapters

    return combine_adapters([a.path for a in config.adapters], config.adapter_weights(), config.method, output,
                            density=config.density, majority_sign_method=config.majority_sign_method,
                            target_rank=config.target_rank, seed=config.seed, overwrite=overwrite,
                            module_filter=config.module_filter)


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    from tuneforge.merge.export import DTYPES, FORMATS
    from tuneforge.merge.gguf_writer import GGUF_TYPES

    parser.add_argument("--model", required=True, help="the base model the adapter was trained on (name, dir, .gguf)")
    parser.add_argument("--adapter", required=True, help="adapter directory (e.g. runs/<name>/adapter)")
    parser.add_argument("--output", required=True, help="output directory")
    parser.add_argument("--format", default="hf", choices=FORMATS, help="hf (safetensors dir) or gguf (default hf)")
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES), help="hf weights dtype (default bf16)")
    parser.add_argument("--gguf-type", default="f16", choices=GGUF_TYPES, help="GGUF matrix encoding (default f16)")
    parser.add_argument("--requantize", action="store_true",
                        help="QLoRA adapters, hf format: write the merged model quantized with the run's settings")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip reading the export back and comparing logits (slow for large GGUF files)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")


def run_export(args: argparse.Namespace) -> int:
    from tuneforge.merge.export import export_model

    report = export_model(args.model, args.adapter, args.output, fmt=args.format, dtype=args.dtype,
                          gguf_type=args.gguf_type, overwrite=args.overwrite, requantize=args.requantize,
                          max_shard_size=args.max_shard_size, verify=args.verify)
    console = Console()
    for line in report.lines():
        console.print(escape(line))
    return 0


def add_compress_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", help="LoRA adapter directory to compress")
    parser.add_argument("output", help="output directory for the compressed adapter")
    parser.add_argument("--density", type=float, default=0.1, help="fraction of each factor's values kept (default 0.1)")
    parser.add_argument("--mixed-precision", action="store_true",
                        help="instead of sparse ternary: SVD of each ΔW, 8 bits for the top directions, fewer for the rest")
    parser.add_argument("--top-rank", type=int, default=2, help="mixed precision: directions kept at 8 bits (default 2)")
    parser.add_argument("--low-bits", type=int, default=3, choices=(2, 3, 4), help="mixed precision: bits of the rest")
    parser.add_argument("--model", default=None,
                        help="base model for the output-difference report (default: the adapter's base_model_name_or_path)")
    parser.add_argument("--eval-data", default="arithmetic", help="data for the KL report (default arithmetic)")
    parser.add_argument("--eval-limit", type=int, default=16, help="examples for the KL report (default 16; 0 skips)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")


def run_compress(args: argparse.Namespace) -> int:
    from tuneforge.merge.compress import compress_adapter, measure_output_difference

    if args.eval_limit < 0:
        raise ConfigError(f"--eval-limit {args.eval_limit} must be 0 (no report) or a positive count")
    result = compress_adapter(args.adapter, args.output, density=args.density, mixed_precision=args.mixed_precision,
                              top_rank=args.top_rank, low_bits=args.low_bits, overwrite=args.overwrite)
    console = Console()
    console.print(f"{escape(result.setting)}: {result.original_bytes / 1e3:.1f} kB -> {result.compressed_bytes / 1e3:.1f} kB "
                  f"(ratio {result.ratio:.1f}x) in {escape(str(result.output))}")
    if args.eval_limit:
        kl = measure_output_difference(args.adapter, args.output, base=args.model, data=args.eval_data,
                                       limit=args.eval_limit)
        console.print(f"mean KL(original ‖ compressed) of next-token distributions: {kl:.4g} nats "
                      f"({args.eval_limit} examples of {escape(args.eval_data)})")
    return 0
