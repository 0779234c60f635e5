"""The ``tuneforge merge`` YAML schemas: whole models (mergekit-like) or LoRA adapters.

Full models::

    merge_method: ties            # linear, task_arithmetic, ties, dare_linear, dare_ties,
    base_model: path/to/base      # magnitude_prune, slerp, model_stock
    models:
      - model: path/to/math
        parameters: {weight: 1.0, density: 0.5}
      - model: path/to/code
        parameters: {weight: 0.7}
    parameters: {density: 0.5, majority_sign_method: total}
    dtype: bfloat16

Adapters (a new PEFT adapter through ``combine.py``)::

    method: ties
    adapters:
      - {path: runs/a/adapter, weight: 1.0}
      - {path: runs/b/adapter, weight: 1.0}
    density: 0.5

Every problem is reported at once, in the config's own key names, with a did-you-mean for misspelt keys.
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tuneforge.errors import ConfigError
from tuneforge.merge.combine import COMBINE_METHODS

FULL_MODEL_METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune", "slerp",
                      "model_stock")
NEEDS_BASE = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune", "model_stock")
USES_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
USES_SIGN = ("ties", "dare_ties")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]?B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}

Density = Field(None, gt=0, le=1, description="fraction of each task vector's values kept, in (0, 1]")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelParameters(Section):
    weight: float = Field(1.0, description="weight of this model's task vector (negative subtracts it)")
    density: float | None = Density


class ModelEntry(Section):
    model: str = Field(description="a model directory with safetensors weights, an embedded name or a hub id")
    parameters: ModelParameters = Field(default_factory=ModelParameters)


class MethodParameters(Section):
    density: float | None = Density
    majority_sign_method: Literal["total", "frequency"] = Field("total", description="TIES sign election")
    t: float | None = Field(None, ge=0, le=1, description="slerp: 0 gives the first model, 1 the second")
    normalize: bool = Field(True, description="linear: divide by the sum of the weights")
    seed: int = Field(0, description="seed of DARE's random drop")


class FullMergeConfig(Section):
    merge_method: Literal[FULL_MODEL_METHODS] = Field(description="how the models are combined")
    models: list[ModelEntry] = Field(min_length=1)
    base_model: str | None = Field(None, description="the model the task vectors are measured from")
    parameters: MethodParameters = Field(default_factory=MethodParameters)
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(None, description="output dtype (default: the inputs')")
    max_shard_size: str | int = Field("5GB", description="largest output shard, e.g. 2GB or 500MB")

    @field_validator("max_shard_size")
    @classmethod
    def _size_readable(cls, value: str | int) -> str | int:
        parse_size(value)
        return value

    @model_validator(mode="after")
    def _method_needs(self) -> "FullMergeConfig":
        method, problems = self.merge_method, []
        if method in NEEDS_BASE and self.base_model is None:
            problems.append(f"merge_method '{method}' measures task vectors from a base: set base_model")
        if method == "model_stock" and len(self.models) < 2:
            problems.append("model_stock needs at least two fine-tuned models besides base_model")
        if method == "slerp":
            ends = len(self.models) + (self.base_model is not None)
            if ends != 2:
                problems.append(f"slerp interpolates exactly two models (base_model counts as the first), got {ends}")
            if self.parameters.t is None:
                problems.append("slerp needs parameters.t, the interpolation factor in [0, 1]")
        if method in USES_DENSITY:
            missing = [i for i, m in enumerate(self.models) if m.parameters.density is None]
            if missing and self.parameters.density is None:
                problems.append(f"merge_method '{method}' needs a density: set parameters.density, or "
                                f"models[{missing[0]}].parameters.density for each model")
        else:
            given = ["parameters.density"] if self.parameters.density is not None else []
            given += [f"models[{i}].parameters.density" for i, m in enumerate(self.models) if m.parameters.density is not None]
            if given:
                problems.append(f"{given[0]} has no effect with merge_method '{method}'; it is used by {', '.join(USES_DENSITY)}")
        if method == "linear" and self.parameters.normalize and sum(m.parameters.weight for m in self.models) == 0:
            problems.append("linear with normalize: true divides by the sum of the weights, which is 0; "
                            "change a weight or set parameters.normalize: false")
        if self.parameters.t is not None and method != "slerp":
            problems.append(f"parameters.t is used only by slerp, not '{method}'")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def density_for(self, index: int) -> float:
        own = self.models[index].parameters.density
        return own if own is not None else self.parameters.density


class AdapterEntry(Section):
    path: str = Field(description="a LoRA adapter directory in PEFT format")
    weight: float = Field(1.0, description="weight of this adapter (negative subtracts a skill)")


class AdapterMergeConfig(Section):
    method: str = Field(description="combination method, e.g. linear, cat, ties, svd")
    adapters: list[AdapterEntry] = Field(min_length=1)
    weights: list[float] | None = Field(None, description="one weight per adapter, instead of each adapter's weight")
    density: float | None = Density
    majority_sign_method: Literal["total", "frequency"] = "total"
    target_rank: int | None = Field(None, gt=0, description="rank of the SVD methods' result")
    seed: int = 0
    module_filter: str | list[str] | None = Field(None, description="module names/suffixes (list) or a regex")

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value not in COMBINE_METHODS:
            close = difflib.get_close_matches(value, list(COMBINE_METHODS), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"unknown method; allowed: {', '.join(COMBINE_METHODS)}{hint}")
        return value

    @model_validator(mode="after")
    def _weights_match(self) -> "AdapterMergeConfig":
        if self.weights is not None and len(self.weights) != len(self.adapters):
            raise ValueError(f"weights has {len(self.weights)} entries for {len(self.adapters)} adapters; "
                             "give one weight per adapter")
        return self

    def adapter_weights(self) -> list[float]:
        return list(self.weights) if self.weights is not None else [a.weight for a in self.adapters]


MergeConfig = FullMergeConfig | AdapterMergeConfig


def parse_merge_config(data: Any, source: str = "merge config") -> MergeConfig:
    """A full-model config (has ``models``) or an adapter config (has ``adapters``); all problems at once."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a merge config must be a mapping of keys to values, found {type(data).__name__}")
    if "adapters" in data and "models" in data:
        raise ConfigError(f"{source}: give either 'models' (merge whole models) or 'adapters' (combine LoRA adapters), not both")
    if "adapters" in data:
        schema: type[Section] = AdapterMergeConfig
    elif "models" in data:
        schema = FullMergeConfig
    else:
        raise ConfigError(f"{source}: no 'models' list (whole-model merge) or 'adapters' list (adapter combination); "
                          f"keys found: {', '.join(map(str, data)) or 'none'}")
    try:
        return schema(**data)
    except ValidationError as exc:
        lines = [_describe(err, schema) for err in exc.errors()]
        raise ConfigError(f"{source} has {len(lines)} problem(s):\n" + "\n".join(lines)) from None


def parse_size(value: str | int) -> int:
    """``"2GB"`` -> 2_000_000_000 bytes (decimal units, as transformers' ``max_shard_size``)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = _SIZE.match(str(value))
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"{value!r} is not a size; write e.g. 2GB, 500MB or a byte count")
    unit = match.group(2).upper() if match.group(2) else None
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def _describe(err: dict, schema: type[Section]) -> str:
    loc = [str(p) for p in err["loc"]]
    key = _dotted(loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        return f"  {key}: unknown key{_did_you_mean(schema, loc)}"
    message = err["msg"].replace("Input should be", "allowed values are").removeprefix("Value error, ")
    if err["type"] == "missing":
        return f"  {key}: missing; {_field_help(schema, loc)}"
    if loc:
        return f"  {key}={err.get('input')!r}: {message}"
    return f"  {message}"


def _dotted(loc: list[str]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if part.isdigit() else (f".{part}" if text else part)
    return text


def _section_at(schema: type[BaseModel], loc: list[str]) -> type[BaseModel] | None:
    current = schema
    for part in loc:
        if part.isdigit():
            continue
        field = current.model_fields.get(part)
        if field is None:
            return None
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        nested = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nested is None:
            return None
        current = nested
    return current


def _did_you_mean(schema: type[BaseModel], loc: list[str]) -> str:
    section = _section_at(schema, loc[:-1])
    if section is None:
        return ""
    known = list(section.model_fields)
    close = difflib.get_close_matches(loc[-1], known, n=1, cutoff=0.6)
    hint = f" — did you mean '{_dotted(loc[:-1] + [close[0]])}'?" if close else ""
    return f"{hint} Allowed keys here: {', '.join(known)}"


def _field_help(schema: type[BaseModel], loc: list[str]) -> str:
    section = _section_at(schema, loc[:-1])
    field = section.model_fields.get(loc[-1]) if section else None
    return (field.description if field is not None and field.description else "this key is required")
