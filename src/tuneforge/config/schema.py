"""The ``tuneforge train`` schema. Defaults live here and nowhere else.

Every problem in a config is reported at once, in the user's key names, with the allowed values and
a "did you mean" for misspelt keys — before any model is loaded.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tuneforge.adapters.config import AdapterConfig, LoraConfig
from tuneforge.config.full_ft import FullConfig, UpdateRuleConfig, check_update_rule
from tuneforge.errors import ConfigError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SelectConfig(Section):
    strategy: str = Field(..., description="selection strategy, or several joined by '+' (see `tuneforge select --help`)")
    budget: float | int | None = Field(None, description="examples to keep: a fraction (0.3) or a count (300); optional for dedup/grape")
    options: dict[str, Any] = Field(default_factory=dict, description="strategy options, e.g. {threshold: 0.9}")
    batch_size: int = Field(16, gt=0, description="sequences per scoring batch")
    cache_dir: str | None = Field(None, description="score cache folder (default ~/.cache/tuneforge/select)")


class DataConfig(Section):
    train: str = Field("arithmetic", description="training data: a .jsonl/.json/.csv/.parquet file, a folder of them, or a bundled dataset name")
    eval: str | None = Field(None, description="held-out data (same forms); for a bundled train set, defaults to its eval split")
    format: Literal["alpaca", "sharegpt", "messages", "prompt_completion", "text"] | None = Field(
        None, description="record format; detected from the keys when not given")
    template: str = Field("auto", description="chat template: auto (the tokenizer's own), chatml, llama3, alpaca, plain")
    max_seq_len: int = Field(512, gt=8, description="tokens per example (and per packed row); longer examples are truncated")
    packing: bool = Field(True, description="pack several examples (or preference pairs) into one row (attention never "
                                               "crosses examples)")
    share_prefix: bool = Field(True, description="with packing, hold the unlabelled tokens every example opens with "
                               "(e.g. a fixed system prompt) once per row: same loss and gradients, fewer tokens to "
                               "compute; not used with model-level methods (prompt/prefix tuning, ReFT, ...)")
    group_by_length: bool = Field(False, description="batch similar lengths together when packing is off")
    train_on: Literal["assistant", "all"] = Field("assistant", description="which tokens carry loss")
    on_bad_record: Literal["error", "skip"] = Field("error", description="stop at a malformed record, or skip and count it")
    options: dict[str, Any] = Field(default_factory=dict, description="options of a bundled dataset, e.g. {size: 2000, seed: 0, language: english}")
    eval_size: int | None = Field(None, ge=0, description="use only the first N eval examples (0: no evaluation)")
    select: SelectConfig | None = Field(None, description="select training examples before training, e.g. "
                                        "{strategy: dedup+ifd, budget: 0.3}; the run's selection/ folder says which were kept and why")


class QuantConfig(Section):
    bits: Literal[4, 8] = Field(4, description="4 (NF4/FP4, QLoRA) or 8 (int8 weight-only); follows type when only type is given")
    type: Literal["nf4", "fp4", "int8"] = Field("nf4", description="codebook: nf4 or fp4 with bits=4, int8 with bits=8 "
                                                "(the default follows bits)")
    double_quant: bool = Field(True, description="quantize the per-block scales too (QLoRA §3)")
    blocksize: int = Field(64, description="values per absmax block (bits=4): 32, 64, 128, ..., 4096")
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype of the dequantized matmul; auto: bfloat16 on a GPU, float32 on a CPU "
                            "(CPUs without bf16 units run bf16 matmuls many times slower)")
    skip_modules: list[str] = Field(default_factory=lambda: ["lm_head"], description="modules left in full precision")

    @model_validator(mode="before")
    @classmethod
    def _type_follows_bits(cls, value: Any) -> Any:
        """``bits: 8`` alone means int8 and ``type: int8`` alone means 8 bits; given both, they must agree."""
        if not isinstance(value, dict):
            return value
        value = dict(value)
        if "type" not in value and value.get("bits") == 8:
            value["type"] = "int8"
        if "bits" not in value and value.get("type") == "int8":
            value["bits"] = 8
        return value

    @model_validator(mode="after")
    def _bits_type_and_blocksize_agree(self) -> "QuantConfig":
        if self.bits == 4 and self.type == "int8":
            raise ValueError("bits=4 with type='int8' disagree: use type nf4 or fp4 with bits 4, or bits 8 for int8")
        if self.bits == 8 and self.type != "int8":
            raise ValueError(f"bits=8 with type={self.type!r} disagree: {self.type} is a 4-bit codebook; "
                             "use bits 4, or type int8 (or leave type out) with bits 8")
        from tuneforge.quant.blockwise import BLOCKSIZES

        if self.bits == 4 and self.blocksize not in BLOCKSIZES:
            raise ValueError(f"blocksize={self.blocksize!r} is not supported; choose one of {', '.join(map(str, BLOCKSIZES))}")
        return self


class TrainingConfig(Section):
    epochs: float = Field(1.0, gt=0, allow_inf_nan=False, description="passes over the training data (ignored when max_steps is set)")
    max_steps: int | None = Field(None, gt=0, description="optimizer steps to run; overrides epochs")
    batch_size: int = Field(8, gt=0, description="rows per micro-batch")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    lr: float = Field(2e-4, gt=0, allow_inf_nan=False, description="peak learning rate")
    weight_decay: float = Field(0.0, ge=0, allow_inf_nan=False, description="AdamW weight decay")
    optimizer: Literal["adamw", "adamw8bit"] = Field(
        "adamw", description="adamw (float32 moments) or adamw8bit (block-wise 8-bit moments, ~4x less state memory)")
    loraplus_ratio: float | None = Field(None, gt=0, allow_inf_nan=False, description="LoRA+: B's learning rate is lr * ratio (paper suggests 16)")
    scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="learning-rate schedule after warmup")
    warmup_steps: int | None = Field(None, ge=0, description="linear warmup steps (default: warmup_ratio of all steps)")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="warmup as a fraction of all steps")
    max_grad_norm: float | None = Field(1.0, gt=0, allow_inf_nan=False, description="clip gradients to this norm (null: no clipping)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="autocast precision of the forward pass (fp16 scales the loss with a GradScaler); auto: "
                            "bf16 on a GPU or CPU that computes in bf16 (AVX512_BF16/AMX), fp16 on older GPUs, "
                            "fp32 otherwise (see models/precision.py)")
    max_nonfinite_steps: int = Field(5, gt=0, description="a step whose loss or gradient norm is NaN/inf is skipped "
                                                          "(no update); stop the run after this many in a row (fp16 "
                                                          "overflows while the loss scale is above 1 do not count)")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward to save memory")
    cpu_memory: Literal["default", "lean"] = Field(
        "default", description="lean: glibc's mmap threshold is fixed at 128 KiB, so memory a step frees goes back "
                               "to the OS instead of staying in the heap (peak RSS of a 0.5B full finetune: "
                               "per-layer GaLore -560 MiB, AdamW -380 MiB), for a page fault per fresh page of "
                               "each large block. For the whole process; no effect without glibc or on a GPU")
    compile: bool = Field(False, description="torch.compile the decoder layers (~1 min once; faster steps on long runs)")
    fused_projections: bool | Literal["auto"] = Field(
        False, description="run q/k/v (and gate/up) LoRA/DoRA layers as one GEMM over their stacked base weights, "
                           "with a frozen-base backward (same results); auto: where it applies and compile is off")
    loss_chunk_size: int = Field(1024, gt=0, description="tokens per chunk of the chunked cross-entropy")
    init_batches: int = Field(4, gt=0, description="training batches shown to data-driven adapter inits "
                                                   "(CorDA, EVA, LoRA-GA) before training")
    seed: int = Field(42, description="seed for data order, adapter init and dropout")
    log_every: int = Field(5, gt=0, description="steps between metric lines")
    eval_every: int | None = Field(None, gt=0, description="steps between evaluations (null: only at the end)")
    save_every: int | None = Field(None, gt=0, description="steps between checkpoints (null: only at the end)")
    keep_checkpoints: int = Field(2, gt=0, description="how many recent checkpoints to keep")
    early_stopping_patience: int | None = Field(None, gt=0, description="stop after this many evals without a better eval loss")
    eval_batch_size: int = Field(16, gt=0, description="rows per evaluation batch")
    eval_generate: int = Field(0, ge=0, description="at each evaluation also generate greedy answers for the first N "
                               "eval examples and record their exact match with the final assistant turn (0: off)")
    objective: Literal["sft", "dpo", "ipo", "kto", "orpo", "simpo", "grpo"] = Field(
        "sft", description="what is trained: sft (next-token loss); dpo, ipo, orpo, simpo on {prompt, chosen, rejected} "
                           "pairs; kto on {prompt, completion, label}; grpo on prompts with checkable answers "
                           "(see docs/preference.md)")
    beta: float | None = Field(None, gt=0, allow_inf_nan=False, description="strength of the objective: beta of DPO/KTO/"
                               "SimPO/GRPO's KL, tau of IPO, lambda of ORPO (default 0.1; SimPO 2.0; GRPO 0.04)")
    simpo_gamma: float = Field(0.5, ge=0, allow_inf_nan=False, description="SimPO's target reward margin gamma")
    rpo_alpha: float | None = Field(None, gt=0, allow_inf_nan=False, description="DPO only: add alpha x the chosen "
                                    "answer's length-normalised NLL (Pang et al. 2024, DPO+NLL; alpha 1 in the paper) so "
                                    "the right answer becomes likelier, not only the wrong one less likely")
    kto_desirable_weight: float = Field(1.0, gt=0, allow_inf_nan=False, description="KTO's lambda_D (desirable examples)")
    kto_undesirable_weight: float = Field(1.0, gt=0, allow_inf_nan=False, description="KTO's lambda_U (undesirable examples)")
    reference: Literal["adapter_off", "init_adapter"] = Field(
        "adapter_off", description="reference model of dpo/ipo/kto/grpo, never a second copy: adapter_off (the base, "
                                   "i.e. the policy with its adapter disabled) or init_adapter (a frozen copy of "
                                   "training.init_adapter)")
    init_adapter: str | None = Field(None, description="start from this saved adapter (e.g. an SFT run's adapter/ "
                                     "folder); its config must match the adapter section")
    cache_reference: bool = Field(True, description="compute each example's reference log-probs once and reuse them")
    grpo_group_size: int = Field(4, ge=2, description="GRPO: completions sampled per prompt (G)")
    grpo_max_new_tokens: int = Field(16, gt=0, description="GRPO: tokens generated per completion")
    grpo_temperature: float = Field(1.0, gt=0, allow_inf_nan=False, description="GRPO: sampling temperature")
    grpo_clip_epsilon: float = Field(0.2, gt=0, lt=1, allow_inf_nan=False, description="GRPO: ratio clip epsilon")
    grpo_reward: str = Field("exact_match", description="GRPO reward: exact_match (the bundled tasks' checker), contains, numeric (last number "
                             "equals the gold number), regex:PATTERN (the pattern's first group equals the gold answer), "
                             "format:PATTERN (the whole reply matches the pattern) or a "
                             "Python callable as module:function taking (completions, answers) -> list of floats")

    @model_validator(mode="after")
    def _objective_settings_agree(self) -> "TrainingConfig":
        if self.reference == "init_adapter" and self.init_adapter is None:
            raise ValueError("reference='init_adapter' needs training.init_adapter (the saved SFT adapter to start from "
                             "and to keep frozen as the reference); set it, or use reference='adapter_off'")
        if self.fused_projections is True and self.compile:
            raise ValueError("fused_projections=true and compile=true do not go together (the fused groups share "
                             "results between layer calls, which compiled layers cannot); set one of them to false, "
                             "or fused_projections='auto' to fuse only without compile")
        if self.rpo_alpha is not None and self.objective != "dpo":
            raise ValueError(f"rpo_alpha adds an NLL term to DPO; objective={self.objective!r} does not take it. "
                             "Remove training.rpo_alpha or set training.objective=dpo")
        if self.objective in ("kto", "grpo") and self.eval_generate:  # pairs are scored against their chosen answer
            raise ValueError(f"eval_generate works with objective sft, dpo, ipo, orpo or simpo (objective="
                             f"{self.objective!r} records reward metrics instead); set training.eval_generate=0")
        return self


class FsdpConfig(Section):
    reshard_after_forward: bool = Field(
        True, description="free each decoder layer's gathered weights after its forward and gather them again for "
                          "backward (ZeRO-3-like, least memory); false keeps them until backward (ZeRO-2-like, "
                          "fewer all-gathers)")
    load_shards: bool = Field(
        True, description="full finetuning of a safetensors model: build the model with empty weights, shard it, "
                          "and read only this rank's rows of each weight, so no rank ever holds the whole model; "
                          "false loads the whole model on every rank first")
    replicas: int = Field(
        1, ge=1, description="HSDP: the processes form this many replica groups; each group shards the model across "
                             "its world_size / replicas processes, and the groups all-reduce gradients. Set it to the "
                             "number of nodes so the all-gathers and reduce-scatters stay inside a node; 1 shards "
                             "across every process (plain FSDP)")
    cpu_offload: bool = Field(
        False, description="keep the weight, gradient and optimizer-state shards in CPU memory and run the optimizer "
                           "step there (FSDP2's CPUOffloadPolicy); each layer's weights are copied to the device for "
                           "its forward and backward. Saves device memory for a slower step; on a CPU device it saves "
                           "nothing")


class DistributedConfig(Section):
    strategy: Literal["auto", "ddp", "fsdp"] = Field(
        "auto", description="how several processes (torchrun, or `tuneforge train --nproc N`) share the work: ddp "
                            "(each holds the model, gradients all-reduced) or fsdp (FSDP2: weights, gradients and "
                            "optimizer state sharded); auto: fsdp for full finetuning, ddp for adapters. One process "
                            "ignores it. training.batch_size is the global micro-batch, split evenly across the processes")
    fsdp: FsdpConfig = Field(default_factory=FsdpConfig, description="FSDP2 settings (distributed.strategy: fsdp)")
    timeout_seconds: int = Field(600, gt=0, description="how long a process waits for the others in a collective "
                                                        "before the job fails")


class TrainConfig(Section):
    model: str = Field("smollm2-135m", description="base model: an embedded name, a local HF directory, a .gguf file or a hub id")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype of the base weights; auto: bfloat16 when training.precision resolves to bf16, "
                            "float32 otherwise (adapter weights stay float32)")
    device: str = Field("auto", description="cpu, cuda, cuda:N or auto")
    output_dir: str = Field("runs/latest", description="run directory: adapter, checkpoints, metrics, plots")
    adapter: AdapterConfig = Field(
        default_factory=LoraConfig,
        description="adapter method and its settings, e.g. {method: lora, r: 16, alpha: 32, target_modules: all-linear}")
    data: DataConfig = Field(default_factory=DataConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    quantization: QuantConfig | None = Field(None, description="load the base model quantized (QLoRA)")
    update_rule: UpdateRuleConfig = Field(
        default_factory=UpdateRuleConfig,
        description="how a step updates the weights (full finetuning: GaLore, APOLLO, BAdam, LISA, LOMO, MeZO)")
    distributed: DistributedConfig = Field(default_factory=DistributedConfig,
                                           description="several processes (see docs/distributed.md)")

    @field_validator("adapter", mode="before")
    @classmethod
    def _adapter_by_method(cls, value: Any) -> Any:
        if isinstance(value, AdapterConfig) or not isinstance(value, dict):
            return value
        from tuneforge.adapters.registry import get_method

        fields = dict(value)
        if fields.get("method") == "full":  # a training mode, not a registered adapter (config/full_ft.py)
            return FullConfig(**fields)
        spec = get_method(fields.setdefault("method", "lora"))
        return spec.config_class(**fields)

    @model_validator(mode="after")
    def _device_spelling(self) -> "TrainConfig":
        device = self.device
        if device not in ("auto", "cpu", "cuda", "mps") and not (device.startswith("cuda:") and device[5:].isdigit()):
            raise ValueError(f"device={device!r} is not one of auto, cpu, cuda, cuda:N, mps")
        return self

    @model_validator(mode="after")
    def _update_rule_fits(self) -> "TrainConfig":
        problems = check_update_rule(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self


def parse_train_config(data: dict[str, Any], source: str = "config") -> TrainConfig:
    """Validate a config dict; every problem is reported in one ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a config must be a mapping of keys to values, found {type(data).__name__}")
    try:
        return TrainConfig(**data)
    except ValidationError as exc:
        raise ConfigError(f"{source} has {exc.error_count()} problem(s):\n" + "\n".join(_describe(exc, data))) from None
    except ConfigError as exc:  # e.g. an unknown adapter method, raised inside a validator
        raise ConfigError(f"{source}: adapter.method: {exc}") from None


def _describe(exc: ValidationError, data: dict[str, Any]) -> list[str]:
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"] if not str(p).startswith("function-")]
        key = ".".join(loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key{_did_you_mean(loc)}")
        elif err["type"] in ("literal_error", "enum"):
            lines.append(f"  {key}={err.get('input')!r}: {err['msg'].replace('Input should be', 'allowed values are')}")
        elif err["type"] == "value_error" and isinstance(err.get("input"), dict):  # a whole-section check
            lines.append(f"  {key}: {err['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"  {key}={err.get('input')!r}: {err['msg']}")
    return lines


def _did_you_mean(loc: list[str]) -> str:
    section = section_class(loc[:-1])
    if section is None:
        return ""
    known = list(section.model_fields)
    close = difflib.get_close_matches(loc[-1], known, n=1, cutoff=0.6)
    hint = f" — did you mean '{'.'.join(loc[:-1] + [close[0]])}'?" if close else ""
    return f"{hint} Allowed keys here: {', '.join(known)}"


def section_class(path: list[str]) -> type[BaseModel] | None:
    """The schema class at a dotted path (``['training']`` -> TrainingConfig)."""
    current: type[BaseModel] = TrainConfig
    for part in path:
        if current is TrainConfig and part == "adapter":
            current = LoraConfig
            continue
        field = current.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        candidates = getattr(annotation, "__args__", (annotation,))
        nested = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nested is None:
            return None
        current = nested
    return current


def describe_keys() -> str:
    """Every key with its type, default and meaning: the body of ``tuneforge train --help``."""
    lines = []

    def walk(cls: type[BaseModel], prefix: str) -> None:
        for name, field in cls.model_fields.items():
            nested = section_class([*prefix.split(".")[:-1], name] if prefix else [name]) if name != "adapter" else None
            if nested is not None and nested is not cls and name in ("data", "training", "quantization",
                                                                                "update_rule", "distributed"):
                lines.append(f"\n{prefix}{name}:  {field.description or ''}".rstrip())
                walk(nested, f"{prefix}{name}.")
                continue
            default = field.get_default(call_default_factory=True)
            if isinstance(default, BaseModel):
                default = default.model_dump(exclude_defaults=True)
            lines.append(f"  {prefix}{name} (default {default!r}): {field.description or ''}")

    walk(TrainConfig, "")
    lines.append("\nadapter.* keys of the default method (lora):")
    for name, field in LoraConfig.model_fields.items():
        lines.append(f"  adapter.{name} (default {field.get_default(call_default_factory=True)!r})")
    lines.append("\nadapter.* keys of full finetuning (adapter.method: full):")
    for name in ("trainable", "layers"):
        field = FullConfig.model_fields[name]
        lines.append(f"  adapter.{name} (default {field.default!r}): {field.description}")
    return "\n".join(lines)


def resolved_output_dir(config: TrainConfig) -> Path:
    return Path(config.output_dir).expanduser()
