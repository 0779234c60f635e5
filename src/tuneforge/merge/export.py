"""``tuneforge export``: merge an adapter into its base and write a model other tools run.

    hf    a transformers directory (safetensors, sharded above ``max_shard_size``), tokenizer and
          chat template included; ``AutoModelForCausalLM.from_pretrained(dir)`` loads it.
    gguf  one GGUF file (f16 or q8_0) for llama.cpp / Ollama, Llama architecture only.

The merge always happens in float32 on a full-precision base, also for an adapter trained on a
4-bit base (QLoRA, detected from the run's ``config.yaml``): merging into packed 4-bit codes would
round W + ΔW back onto the 4-bit grid and lose most of ΔW, so the base is loaded unquantized
("dequantize-merge"), merged, and written in bf16/fp16, or re-quantized on request.

Every export is verified: the written model is read back (the GGUF through transformers' GGUF
loader) and its next-token distributions on a few prompts are compared with the unmerged adapter
model (on the quantized base for QLoRA): max |Δlogit| and mean KL(adapter model ‖ export).
The numbers go into ``export_report.json`` beside the model.
"""

from __future__ import annotations

import gc
import json
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml
from torch import nn

from tuneforge.errors import AdapterError, ConfigError
from tuneforge.fileio import atomic_write_json
from tuneforge.merge.gguf_writer import GGUF_TYPES, check_llama, write_gguf
from tuneforge.merge.staging import check_new_output, staged_directory

FORMATS = ("hf", "gguf")
DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
REPORT_FILE = "export_report.json"
RUN_CONFIG = "config.yaml"
VERIFY_PROMPTS = (
    "The capital of France is",
    "Tom has 3 apples and buys 4 more. How many apples does Tom have now?",
    "There are 3 boxes. The key is in box 1. Move the key to box 2. Which box holds the key?",
    "def add(a, b):\n    return",
)


@dataclass
class OutputDifference:
    """How far the exported model's next-token distributions are from the adapter model's."""

    max_abs_logit_diff: float
    mean_kl: float
    positions: int


@dataclass
class ExportReport:
    output: str
    format: str
    files: list[str]
    dtype: str
    gguf_type: str | None
    quantized_base: dict | None
    requantized: bool
    difference: OutputDifference | None
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        d = self.difference
        reference = "the unmerged adapter on the quantized base" if self.quantized_base else "the unmerged adapter model"
        check = (f"read back, vs {reference}: max |Δlogit| {d.max_abs_logit_diff:.4g}, mean KL {d.mean_kl:.3g} nats "
                 f"over {d.positions} positions" if d else "not verified (--no-verify)")
        return [f"wrote {self.format} export to {self.output}: {', '.join(self.files)}", check, *self.notes]


def find_run_quantization(adapter_dir: Path) -> dict | None:
    """The ``quantization:`` section of the training run the adapter came from, if it has one.

    The adapter's own record (``tuneforge_training.json``, written by ``save_adapter``) comes first:
    it travels with the adapter when the folder is copied out of its run. Otherwise the run's
    config: ``tuneforge train`` writes ``runs/<name>/config.yaml`` beside ``adapter/``; checkpoints
    sit at ``checkpoints/step-N/adapter``, two levels further down.
    """
    from tuneforge.adapters.peft_format import read_base_quantization

    recorded = read_base_quantization(adapter_dir)
    if recorded is not None:
        return recorded
    for parent in list(adapter_dir.resolve().parents)[:3]:
        path = parent / RUN_CONFIG
        if path.is_file():
            try:
                data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            except yaml.YAMLError:
                return None
            if not isinstance(data, dict) or "adapter" not in data:
                continue  # some other project's config.yaml, not a training run's
            section = data.get("quantization")
            return dict(section) if section else None
    return None


def _quantize(model: nn.Module, settings: dict) -> None:
    from tuneforge.config.schema import QuantConfig
    from tuneforge.quant import quantize_model

    try:
        quant = QuantConfig(**settings)
    except (TypeError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
        raise ConfigError(f"the run's quantization settings {settings!r} are not valid: {exc}") from None
    from tuneforge.quant.presets import compute_dtype_for

    # Exports merge and verify on the CPU, where training's "auto" means float32.
    quantize_model(model, bits=quant.bits, quant_type=quant.type, double_quant=quant.double_quant,
                   blocksize=quant.blocksize, compute_dtype=compute_dtype_for(quant.compute_dtype, "cpu"),
                   skip_modules=quant.skip_modules)


def check_export_options(output: Path, fmt: str, dtype: str, gguf_type: str, overwrite: bool,
                         adapter_dir: Path) -> None:
    """Everything cheap, before any model is loaded."""
    problems = []
    if fmt not in FORMATS:
        problems.append(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        problems.append(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if gguf_type not in GGUF_TYPES:
        problems.append(f"--gguf-type {gguf_type!r} is not one of {', '.join(GGUF_TYPES)}")
    if not (adapter_dir / "adapter_config.json").is_file():
        problems.append(f"--adapter {str(adapter_dir)!r} has no adapter_config.json; give a directory saved by "
                        "tuneforge train (runs/<name>/adapter) or by peft")
    if problems:
        raise ConfigError("cannot export:\n" + "\n".join(f"  - {p}" for p in problems))
    check_new_output(output, overwrite)


def export_model(base: str, adapter_dir: str | Path, output: str | Path, *, fmt: str = "hf", dtype: str = "bf16",
                 gguf_type: str = "f16", overwrite: bool = False, quantization: dict | None | str = "auto",
                 requantize: bool = False, max_shard_size: str = "5GB",
                 prompts: tuple[str, ...] = VERIFY_PROMPTS, verify: bool = True) -> ExportReport:
    """Merge ``adapter_dir`` into ``base`` and write it to ``output`` (see the module docstring).

    ``quantization``: "auto" reads the training run's config; a dict (the ``quantization:`` keys)
    forces the QLoRA path; None treats the base as full precision. ``requantize`` (hf only, QLoRA
    adapters) writes the merged model quantized again with the run's settings (``quant.save_quantized``).
    ``verify=False`` skips reading the export back (for transformers, parsing a large GGUF takes minutes);
    the report's difference is then None.
    """
    from tuneforge.adapters import merge_and_unload
    from tuneforge.models import load_model

    adapter_dir, output = Path(adapter_dir), Path(output)
    check_export_options(output, fmt, dtype, gguf_type, overwrite, adapter_dir)
    settings = find_run_quantization(adapter_dir) if quantization == "auto" else quantization
    if requantize and (settings is None or fmt != "hf"):
        raise ConfigError("--requantize re-applies the 4-bit/int8 settings of a QLoRA run to the merged model and "
                          "needs --format hf and an adapter trained on a quantized base; for a smaller GGUF use "
                          "--gguf-type q8_0")
    loaded = load_model(base, dtype="float32")
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    if fmt == "gguf":
        check_llama(model.config)  # refuse before the slow part
    batch = _prompt_batch(tokenizer, prompts)
    reference = _reference_logits(base, adapter_dir, settings, batch) if settings and verify else None
    _load_adapter_checked(model, adapter_dir)
    if reference is None and verify:
        reference = _logits(model, batch)
    merged = merge_and_unload(model)
    notes = []
    if settings:
        notes.append("dequantize-merge: the adapter was trained on a quantized base "
                     f"({settings.get('type', 'nf4')}, {settings.get('bits', 4)} bits); it was merged into the "
                     "full-precision base")
    with staged_directory(output, overwrite) as staging:
        if fmt == "hf":
            files, read_back = _write_hf(merged, tokenizer, staging, DTYPES[dtype], settings if requantize else None,
                                         max_shard_size)
        else:
            files, read_back = _write_gguf_file(merged, tokenizer, staging, gguf_type, base)
        difference = compare_logits(reference, _logits(read_back(), batch)) if verify else None
        report = ExportReport(str(output), fmt, files, dtype if fmt == "hf" else "-",
                              gguf_type if fmt == "gguf" else None, settings, requantize, difference, notes)
        atomic_write_json(staging / REPORT_FILE, asdict(report))
    return report


def _load_adapter_checked(model: nn.Module, adapter_dir: Path) -> None:
    from tuneforge.adapters import load_adapter
    from tuneforge.adapters.peft_format import QuantizedTrainingWarning

    try:
        with warnings.catch_warnings():
            # A QLoRA adapter meets the float base here on purpose (dequantize-merge); the report says so.
            warnings.simplefilter("ignore", QuantizedTrainingWarning)
            load_adapter(model, adapter_dir)
    except AdapterError as exc:
        raise AdapterError(f"{exc}\n(The adapter does not fit this base model; pass the --model it was trained on.)") from None


def _reference_logits(base: str, adapter_dir: Path, settings: dict, batch: dict) -> torch.Tensor:
    """Logits of the unmerged adapter on the quantized base, as it was trained; the copy is freed after."""
    from tuneforge.models import load_model

    quantized = load_model(base, dtype="float32").model.eval()
    _quantize(quantized, settings)
    _load_adapter_checked(quantized, adapter_dir)
    logits = _logits(quantized, batch)
    del quantized
    gc.collect()
    return logits


def _write_hf(model: nn.Module, tokenizer, staging: Path, dtype: torch.dtype, requantize: dict | None,
              max_shard_size: str) -> tuple[list[str], Callable[[], nn.Module]]:
    from transformers import AutoModelForCausalLM

    if requantize:
        from tuneforge.quant.loading import load_saved_quantized, save_quantized

        _quantize(model, requantize)
        save_quantized(model, staging, tokenizer)
        return sorted(p.name for p in staging.iterdir()), lambda: load_saved_quantized(staging)
    model = model.to(dtype)
    model.config.dtype = str(dtype).removeprefix("torch.")
    model.save_pretrained(staging, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(staging)  # tokenizer files and chat_template.jinja
    files = sorted(p.name for p in staging.iterdir())
    del model
    gc.collect()
    return files, lambda: AutoModelForCausalLM.from_pretrained(staging, dtype=torch.float32).eval()


def _write_gguf_file(model: nn.Module, tokenizer, staging: Path, gguf_type: str,
                     base: str) -> tuple[list[str], Callable[[], nn.Module]]:
    from transformers import AutoModelForCausalLM

    name = f"model-{gguf_type}.gguf"
    write_gguf(model, tokenizer, staging / name, gguf_type, name=f"{Path(base).name} + tuneforge adapter")
    del model
    gc.collect()
    return [name], lambda: AutoModelForCausalLM.from_pretrained(staging, gguf_file=name, dtype=torch.float32).eval()


def _prompt_batch(tokenizer, prompts: tuple[str, ...]) -> dict[str, torch.Tensor]:
    return dict(tokenizer(list(prompts), return_tensors="pt", padding=True))


@torch.no_grad()
def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Float32 logits at the real (unpadded) positions: (positions, vocab)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    return logits[batch["attention_mask"].bool()]


def compare_logits(reference: torch.Tensor, other: torch.Tensor) -> OutputDifference:
    """max |Δlogit| and mean KL(reference ‖ other) of the next-token distributions, per position."""
    vocab = min(reference.shape[-1], other.shape[-1])
    reference, other = reference[..., :vocab].double(), other[..., :vocab].double()
    log_p, log_q = reference.log_softmax(-1), other.log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return OutputDifference(float((reference - other).abs().max()), float(kl.mean().clamp(min=0)),
                            int(reference.shape[0]))


def report_json(report: ExportReport) -> str:
    return json.dumps(asdict(report), indent=2)
