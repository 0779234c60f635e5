"""Adapter configs: typed, validated, and mapped to/from the HF PEFT ``adapter_config.json``.

Fields shared by every method carry the same names everywhere (``target_modules``,
``exclude_modules``, ``dropout``, ``init``), so a user who knows one method knows the others.
"""

from __future__ import annotations

import re
import warnings
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tuneforge.errors import ConfigError

TargetSpec = list[str] | str | None

# PEFT metadata or settings whose default values change nothing; never worth a warning.
SILENT_PEFT_KEYS = {
    "peft_type", "tuneforge_method", "base_model_name_or_path", "revision", "task_type",
    "inference_mode", "peft_version", "auto_mapping", "megatron_core", "qalora_group_size",
}


class AdapterConfig(BaseModel):
    """Fields every layer-wrapping method understands.

    target_modules: a list matches a module whose name equals an entry or ends with ``.entry``;
        a single string is a regular expression that must match the whole module name;
        ``"all-linear"`` selects every Linear/Conv1D layer except the output head.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    method: str
    target_modules: TargetSpec = "all-linear"
    exclude_modules: TargetSpec = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None

    # Name used in PEFT's ``peft_type`` field; None means PEFT has no such method.
    peft_type: ClassVar[str | None] = None
    # Our field name -> PEFT's field name, where they differ.
    peft_field_names: ClassVar[dict[str, str]] = {}

    @field_validator("layers_to_transform")
    @classmethod
    def _layers_as_list(cls, value):
        return [value] if isinstance(value, int) else value

    def to_peft_dict(self) -> dict[str, Any]:
        data = self.model_dump(exclude={"method"})
        data = {self.peft_field_names.get(k, k): v for k, v in data.items()}
        if self.peft_type:
            data["peft_type"] = self.peft_type
        data["tuneforge_method"] = self.method
        return data

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any], source: str = "adapter_config.json") -> "AdapterConfig":
        """Read a PEFT config; keys we do not know are ignored with one warning (forward compatibility)."""
        ours = {v: k for k, v in cls.peft_field_names.items()}
        known = set(cls.model_fields)
        kept, ignored = {}, []
        for key, value in data.items():
            name = ours.get(key, key)
            if name in known and name != "method":
                kept[name] = value
            elif key not in SILENT_PEFT_KEYS and value not in (None, {}, [], False):
                ignored.append(key)
        kept = cls.normalize_peft_values(kept)
        if ignored:
            warnings.warn(
                f"{source}: ignoring keys tuneforge does not use: {', '.join(sorted(ignored))}",
                stacklevel=2,
            )
        return validate_config(cls, kept, source)

    @classmethod
    def normalize_peft_values(cls, data: dict[str, Any]) -> dict[str, Any]:
        """Hook for methods whose PEFT values need translating (e.g. init flags)."""
        return data


def validate_config(cls: type[AdapterConfig], data: dict[str, Any], source: str) -> AdapterConfig:
    """Build ``cls`` from ``data``; every problem is reported at once, in the user's key names."""
    try:
        return cls(**data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(config)"
            problems.append(f"  {key}: {err['msg']} (got {err.get('input')!r})")
        raise ConfigError(f"{source}: invalid {cls.__name__}:\n" + "\n".join(problems)) from None


class LoraConfig(AdapterConfig):
    """LoRA and its direct variants: rsLoRA scaling, DoRA, LoRA+ (an optimizer setting).

    ΔW = (alpha / r) · B A, or (alpha / sqrt(r)) · B A with ``use_rslora`` (Kalajdzievski 2023).
    """

    method: Literal["lora"] = "lora"
    r: int = Field(16, gt=0)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    use_rslora: bool = False
    use_dora: bool = False
    # kaiming/gaussian: B = 0. The others derive A and B from the base weight (pissa, olora, loftq) or
    # from calibration batches (corda, lora-ga, eva); see adapters/lora/inits/.
    init: Literal["kaiming", "gaussian", "pissa", "olora", "corda", "lora-ga", "eva", "loftq"] = "kaiming"
    rank_pattern: dict[str, int] = Field(default_factory=dict)
    alpha_pattern: dict[str, float] = Field(default_factory=dict)
    fan_in_fan_out: bool = False
    bias: Literal["none"] = "none"
    # Settings of the initialisations above, each read only by the init it names.
    pissa_niter: int | None = Field(None, ge=1, description="pissa: randomized-SVD iterations; None = exact SVD")
    corda_mode: Literal["instruction-previewed", "knowledge-preserved"] = "instruction-previewed"
    lora_ga_gamma: float = Field(16.0, gt=0, description="lora-ga: the stable-scale gamma")
    eva_rho: float = Field(2.0, ge=1.0, description="eva: a layer may receive up to rho * r ranks")
    loftq_iters: int = Field(1, ge=1, description="loftq: alternating quantize / SVD rounds")
    loftq_bits: Literal[4] = 4

    # Fields that PEFT keeps elsewhere (in init_lora_weights or a sub-config).
    init_settings: ClassVar[tuple[str, ...]] = (
        "pissa_niter", "corda_mode", "lora_ga_gamma", "eva_rho", "loftq_iters", "loftq_bits")
    peft_type: ClassVar[str] = "LORA"
    peft_field_names: ClassVar[dict[str, str]] = {
        "alpha": "lora_alpha",
        "dropout": "lora_dropout",
        "init": "init_lora_weights",
    }

    def to_peft_dict(self) -> dict[str, Any]:
        data = super().to_peft_dict()
        for name in self.init_settings:
            data.pop(name)
        # PEFT spells the default Kaiming-uniform init as ``True``.
        data["init_lora_weights"] = True if self.init == "kaiming" else self.init
        data.update(self._peft_init_fields())
        return data

    def _peft_init_fields(self) -> dict[str, Any]:
        """PEFT's spelling of the data-aware inits: a string plus, for some, a sub-config."""
        if self.init == "pissa":
            return {"init_lora_weights": "pissa" if self.pissa_niter is None else f"pissa_niter_{self.pissa_niter}"}
        if self.init == "corda":
            return {"corda_config": {"corda_method": "ipm" if self.corda_mode == "instruction-previewed" else "kpm"}}
        if self.init == "lora-ga":
            return {"init_lora_weights": "lora_ga",
                    "lora_ga_config": {"direction": "ArB2r", "scale": "stable", "stable_gamma": self.lora_ga_gamma}}
        if self.init == "eva":
            return {"eva_config": {"rho": self.eva_rho}}
        if self.init == "loftq":
            return {"loftq_config": {"loftq_bits": self.loftq_bits, "loftq_iter": self.loftq_iters}}
        return {}

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any], source: str = "adapter_config.json") -> "AdapterConfig":
        data = dict(data)
        # PEFT keeps init settings in sub-configs; lift the ones we use into our flat fields.
        corda = data.pop("corda_config", None) or {}
        eva = data.pop("eva_config", None) or {}
        loftq = data.pop("loftq_config", None) or {}
        lora_ga = data.pop("lora_ga_config", None) or {}
        if "corda_method" in corda:
            data["corda_mode"] = {"ipm": "instruction-previewed", "kpm": "knowledge-preserved"}.get(
                corda["corda_method"], corda["corda_method"])
        if "rho" in eva:
            data["eva_rho"] = eva["rho"]
        if "loftq_bits" in loftq:
            data["loftq_bits"] = loftq["loftq_bits"]
        if "loftq_iter" in loftq:
            data["loftq_iters"] = loftq["loftq_iter"]
        if "stable_gamma" in lora_ga:
            data["lora_ga_gamma"] = lora_ga["stable_gamma"]
        return super().from_peft_dict(data, source)

    @classmethod
    def normalize_peft_values(cls, data: dict[str, Any]) -> dict[str, Any]:
        init = data.get("init")
        if init is True:
            data["init"] = "kaiming"
        elif init is False:
            # PEFT's ``False`` means B and A random (not identity); only used for tests, and the
            # weights are loaded from the file right after, so the init does not matter.
            data["init"] = "gaussian"
        elif init == "lora_ga":
            data["init"] = "lora-ga"
        elif isinstance(init, str) and init.startswith("pissa_niter_"):
            niter = init[len("pissa_niter_"):]
            data["init"] = "pissa"
            data["pissa_niter"] = int(niter) if niter.isdigit() else niter  # a bad value is reported by validation
        return data

    def rank_for(self, module_name: str) -> int:
        return _pattern_value(self.rank_pattern, module_name, self.r)

    def alpha_for(self, module_name: str) -> float:
        return _pattern_value(self.alpha_pattern, module_name, self.alpha)


def _pattern_value(patterns: dict[str, Any], module_name: str, default: Any) -> Any:
    """PEFT semantics: a pattern key matches a module name that ends with it, as a regex."""
    for pattern, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?(?:{pattern})", module_name):
            return value
    return default
