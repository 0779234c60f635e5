"""Export an adapter whose init carries a residual as a plain LoRA for the unmodified base.

PiSSA, OLoRA, CorDA and LoRA-GA train on W - s·B0 A0. Relative to the original W the trained model
is W + s·(B A - B0 A0) = W + s·[B, -B0] [A; A0]: a plain LoRA of rank 2r with the same scaling
(alpha doubles with rank, or grows by sqrt(2) under rsLoRA). It loads onto the original base in any
PEFT-compatible tool, with no init to re-run and no calibration data.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from tuneforge.adapters.config import LoraConfig
from tuneforge.adapters.lora.inits.residual import InitialisedLoraLinear
from tuneforge.adapters.model import adapter_book, wrapped_layers
from tuneforge.adapters.peft_format import CONFIG_FILE, PREFIX, WEIGHTS_FILE, adapter_state, peft_loadable_targeting
from tuneforge.errors import AdapterError
from tuneforge.fileio import atomic_write, atomic_write_json, atomic_write_text

RESIDUAL_INITS = ("pissa", "olora", "corda", "lora-ga")


def export_as_plain_lora(model: nn.Module, adapter_name: str, directory: str | Path, *,
                         base_model_name: str | None = None) -> Path:
    """Write adapter ``adapter_name`` as a rank-2r plain LoRA (PEFT format) for the original base."""
    config = _exportable_config(model, adapter_name)
    state = {key: value.detach().to("cpu").contiguous() for key, value in adapter_state(model, adapter_name).items()}
    transposed = False
    for layer_name, layer in wrapped_layers(model):
        adapter = layer.adapters[adapter_name] if adapter_name in layer.adapters else None
        if isinstance(adapter, InitialisedLoraLinear):
            adapter._refuse_if_pending()
            transposed = transposed or adapter.transposed
            lora_A, lora_B = stacked_factors(adapter)
            state[f"{PREFIX}{layer_name}.lora_A.weight"] = lora_A.detach().to("cpu").contiguous()
            state[f"{PREFIX}{layer_name}.lora_B.weight"] = lora_B.detach().to("cpu").contiguous()
    plain = doubled_rank_config(config)
    peft_config = peft_loadable_targeting(model, adapter_name, plain.to_peft_dict())
    if transposed:
        peft_config["fan_in_fan_out"] = True
    peft_config.update(base_model_name_or_path=base_model_name or _base_model_name(model),
                       task_type="CAUSAL_LM" if type(model).__name__.endswith("ForCausalLM") else None,
                       inference_mode=True)
    directory = Path(directory)
    atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    atomic_write_json(directory / CONFIG_FILE, peft_config)
    atomic_write_text(directory / "README.md", _model_card(config, peft_config))
    return directory


def _exportable_config(model: nn.Module, adapter_name: str) -> LoraConfig:
    configs = adapter_book(model).configs
    if adapter_name not in configs:
        raise AdapterError(f"no adapter named '{adapter_name}' to export; the model has {list(configs) or 'no adapters'}")
    config = configs[adapter_name]
    if not isinstance(config, LoraConfig) or config.init not in RESIDUAL_INITS:
        init = getattr(config, "init", None)
        hint = (" LoftQ's base is the quantized Q, and W - Q is not low-rank, so no plain LoRA reproduces it "
                "on the full-precision base; save it with save_adapter and load it with tuneforge, which "
                "re-derives Q." if init == "loftq" else " Its base weights are unchanged: save_adapter already "
                "writes a plain adapter.")
        raise AdapterError(f"export_as_plain_lora applies to LoRA inits {', '.join(RESIDUAL_INITS)}; adapter "
                           f"'{adapter_name}' is method={config.method}, init={init}.{hint}")
    return config


def stacked_factors(adapter: InitialisedLoraLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """([A; A0] (2r, in), [B, -B0] (out, 2r)): s·B' A' = s·(B A - B0 A0)."""
    return torch.cat([adapter.lora_A, adapter.init_A]), torch.cat([adapter.lora_B, -adapter.init_B], dim=1)


def doubled_rank_config(config: LoraConfig) -> LoraConfig:
    """The same adapter at rank 2r with the same scaling s, and the default init (nothing to re-derive)."""
    factor = math.sqrt(2) if config.use_rslora else 2.0
    return config.model_copy(update={
        "init": "kaiming",
        "r": 2 * config.r,
        "alpha": config.alpha * factor,
        "rank_pattern": {key: 2 * value for key, value in config.rank_pattern.items()},
        "alpha_pattern": {key: value * factor for key, value in config.alpha_pattern.items()},
    })


def _base_model_name(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "_name_or_path", None) or None


def _model_card(config: LoraConfig, peft_config: dict) -> str:
    base = peft_config.get("base_model_name_or_path") or "(not recorded)"
    return (
        f"---\nlibrary_name: peft\nbase_model: {base}\ntags: [tuneforge, lora, {config.init}]\n---\n\n"
        f"# LoRA adapter (exported from a {config.init} initialisation)\n\n"
        f"Trained with tuneforge from `init: {config.init}` at rank {config.r}, which trains on the residual "
        "W - s·B0 A0 of the base weights. This export is a **plain LoRA of rank "
        f"{2 * config.r}** relative to the **original, unmodified** base model `{base}`: "
        "ΔW = s·(B A - B0 A0) = s·[B, -B0][A; A0], with the same scaling s. Load it with "
        "`tuneforge.adapters.load_adapter` or `peft.PeftModel.from_pretrained` on the original base; no "
        "init is re-run.\n\n"
        f"- training config: `{json.dumps(config.model_dump(exclude_defaults=True), default=str)}`\n"
    )
