"""The extension point for model-level methods: adapters that change the backbone's inputs, cache or
hidden states instead of one Linear layer's weights (prompt/prefix tuning, P-tuning, adaption
prompts, LoReFT/DiReFT).

A model-level method registers ``MethodSpec(attach=...)``: ``attach(model, config, adapter_name,
**options)`` returns a ``ModelAdapter``. The adapters live in one ``ModelLevelAdapters`` submodule of
the model (so their parameters are the model's parameters, and ``.to()``/``state_dict`` see them),
which hooks the backbone (``model.base_model``, e.g. ``LlamaModel``) once:

    backbone kwargs --before_backbone (each live adapter)--> backbone --finishers (reverse)--> output

Hooking the backbone rather than the ``...ForCausalLM`` wrapper means the chunked training loss
(``losses.py`` calls the backbone directly), evaluation and ``generate`` all see the same adapter.
An adapter that needs more (ReFT edits decoder-layer outputs, adaption prompts add to attention
outputs) registers its own module hooks in ``attach`` through ``ModelAdapter.hook``; they act only
while the adapter is ``live`` (active and not disabled), which the container keeps up to date, so
activation and disabling stay in one place. Merging is refused: there is no weight delta.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from pydantic import model_validator
from torch import nn
from torch.utils.hooks import RemovableHandle

from tuneforge.adapters.config import AdapterConfig, TargetSpec
from tuneforge.adapters.hooks import TrainingHooks
from tuneforge.errors import AdapterError
from tuneforge.models.cache_keyword import get_cache

CONTAINER_ATTRIBUTE = "tuneforge_model_adapters"
BackboneInputs = dict[str, Any]
Finisher = Callable[[Any], Any]


# Layer-selection fields mean nothing to a model-level method; PEFT's prompt-learning configs lack them.
LAYER_SELECTION_FIELDS = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern")
# Fields PEFT copies from the base model's config into adapter_config.json; we derive them from the model.
MODEL_DERIVED_PEFT_KEYS = {"token_dim", "num_layers", "num_attention_heads", "num_transformer_submodules"}


class ModelLevelConfig(AdapterConfig):
    """Base of model-level configs: no layer targeting; model-derived PEFT fields are read from the model."""

    target_modules: TargetSpec = None

    @model_validator(mode="after")
    def _no_layer_selection(self):
        chosen = [key for key in LAYER_SELECTION_FIELDS if getattr(self, key) is not None]
        if chosen:
            raise ValueError(f"{', '.join(chosen)} select layers for layer-wrapping methods and mean nothing to "
                             f"'{self.method}'; remove them")
        return self

    def to_peft_dict(self) -> dict[str, Any]:
        data = super().to_peft_dict()
        for key in LAYER_SELECTION_FIELDS:
            data.pop(key, None)
        return data

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any], source: str = "adapter_config.json") -> AdapterConfig:
        ignored = MODEL_DERIVED_PEFT_KEYS | set(LAYER_SELECTION_FIELDS)  # e.g. adaption prompt's "self_attn"
        kept = {key: value for key, value in data.items() if key not in ignored}
        return super().from_peft_dict(kept, source)


class ModelAdapter(nn.Module):
    """One adapter of a model-level method. Subclasses override what they need."""

    mergeable = False

    def __init__(self) -> None:
        super().__init__()
        self._handles: list[RemovableHandle] = []
        # Active and not disabled; kept by ModelLevelAdapters. Module hooks check it rather than a flag
        # set during the backbone call: checkpointed layers re-run them in backward, after the call.
        self.live = False

    def before_backbone(self, backbone: nn.Module, inputs: BackboneInputs) -> Finisher | None:
        """Edit the backbone's keyword inputs in place; return a function applied to its output, if any."""
        return None

    def hook(self, handle: RemovableHandle) -> None:
        """Keep a module hook registered in ``attach`` so that ``detach`` removes it."""
        self._handles.append(handle)

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors to save under their full PEFT file keys (e.g. ``prompt_embeddings``)."""
        raise NotImplementedError

    def load_file_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Take the tensors ``file_tensors`` names (shapes already checked)."""
        own = self.file_tensors()
        with torch.no_grad():
            for key, target in own.items():
                target.copy_(tensors[key].to(target.dtype))

    def parameter_roles(self) -> dict[str, list[nn.Parameter]]:
        return {"default": list(self.parameters())}

    def peft_fields(self) -> dict[str, Any]:
        """Model-derived fields of PEFT's adapter_config.json (e.g. token_dim, num_layers)."""
        return {}

    def training_form(self) -> nn.Module | None:
        """The reparameterisation that files do not hold (they hold its output), if the method has one."""
        return None

    def restore_training_form(self, form: nn.Module) -> None:
        """Switch back from loaded output tensors to ``form`` (same parameter objects the optimizer holds)."""
        raise NotImplementedError


class ModelLevelAdapters(nn.Module):
    """All model-level adapters of one model, plus the backbone hooks that run the live ones."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.active: list[str] = []
        self.disabled = False
        self._finishers: list[list[Finisher]] = []
        self._handles = [
            backbone.register_forward_pre_hook(self._before, with_kwargs=True),
            backbone.register_forward_hook(self._after, always_call=True),
        ]

    def live_adapters(self) -> list[ModelAdapter]:
        if self.disabled:
            return []
        return [self.adapters[name] for name in self.active if name in self.adapters]

    def refresh_live(self) -> None:
        live = {id(adapter) for adapter in self.live_adapters()}
        for adapter in self.adapters.values():
            adapter.live = id(adapter) in live

    def _before(self, backbone: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        live = self.live_adapters()
        if live and args:
            kwargs = {**kwargs, "input_ids": args[0]}
            if len(args) > 1:
                raise AdapterError("model-level adapters need the backbone's inputs after input_ids as keywords")
            args = ()
        finishers: list[Finisher] = []
        # Pushed before the adapters run: the always-called forward hook pops it even when one raises.
        self._finishers.append(finishers)
        for adapter in live:
            finish = adapter.before_backbone(backbone, kwargs)
            if finish is not None:
                finishers.append(finish)
        return args, kwargs

    def _after(self, backbone: nn.Module, args: tuple, output: Any) -> Any:
        finishers = self._finishers.pop() if self._finishers else []
        if output is None:  # the backbone raised; nothing to finish
            return output
        for finish in reversed(finishers):
            output = finish(output)
        return output

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()

    def extra_repr(self) -> str:
        return f"active={self.active}"


def backbone_of(model: nn.Module) -> nn.Module:
    backbone = getattr(model, "base_model", None)
    if backbone is None or backbone is model or not hasattr(backbone, "get_input_embeddings"):
        raise AdapterError(
            f"{type(model).__name__} has no separate transformer backbone (model.base_model); model-level "
            "adapters (prompt/prefix tuning, P-tuning, adaption prompts, ReFT) need a transformers causal LM"
        )
    return backbone


def container_of(model: nn.Module) -> ModelLevelAdapters | None:
    return getattr(model, CONTAINER_ATTRIBUTE, None)


def model_adapters(model: nn.Module) -> Iterator[tuple[str, ModelAdapter]]:
    container = container_of(model)
    if container is not None:
        yield from container.adapters.items()


def attach_model_adapter(model: nn.Module, adapter: ModelAdapter, name: str) -> None:
    container = container_of(model)
    if container is None:
        container = ModelLevelAdapters(backbone_of(model))
        model.add_module(CONTAINER_ATTRIBUTE, container)
    container.adapters[name] = adapter
    container.refresh_live()


def detach_model_adapter(model: nn.Module, name: str) -> None:
    container = container_of(model)
    if container is None or name not in container.adapters:
        return
    container.adapters[name].live = False
    container.adapters[name].detach()
    del container.adapters[name]
    container.active = [n for n in container.active if n != name]
    container.refresh_live()
    if not container.adapters:
        container.remove_hooks()
        delattr(model, CONTAINER_ATTRIBUTE)


def set_active_model_adapters(model: nn.Module, names: list[str]) -> None:
    container = container_of(model)
    if container is None:
        return
    live = [n for n in names if n in container.adapters]
    if len(live) > 1:
        raise AdapterError(
            f"adapters {live} are model-level (virtual tokens or interventions) and only one of them can be active "
            "at a time; activate one of them (layer-level adapters such as LoRA may be active beside it)"
        )
    container.active = live
    container.refresh_live()


def set_model_adapters_disabled(model: nn.Module, disabled: bool) -> None:
    container = container_of(model)
    if container is not None:
        container.disabled = disabled
        container.refresh_live()


def refuse_merge(model: nn.Module, names: list[str]) -> None:
    """Model-level adapters have no weight delta: merging must fail before any weight changes."""
    container = container_of(model)
    unmergeable = [n for n in names if container is not None and n in container.adapters]
    if unmergeable:
        raise AdapterError(
            f"adapter(s) {unmergeable} change the model's inputs, attention cache or hidden states, not its weights, "
            "so they cannot be merged; the base model is unchanged. Keep them as adapters (save_adapter) instead"
        )


# --- helpers shared by the virtual-token methods (prompt tuning, P-tuning, prefix tuning) ---

def past_length(inputs: BackboneInputs) -> int:
    cache = get_cache(inputs)
    return int(cache.get_seq_length()) if cache is not None else 0


def new_length(inputs: BackboneInputs) -> int:
    tokens = inputs.get("input_ids")
    return int(tokens.shape[1] if tokens is not None else inputs["inputs_embeds"].shape[1])


def batch_size(inputs: BackboneInputs) -> int:
    tokens = inputs.get("input_ids")
    return int(tokens.shape[0] if tokens is not None else inputs["inputs_embeds"].shape[0])


def check_position_budget(model_config: Any, num_virtual_tokens: int, positions: int) -> None:
    """Virtual tokens use positions too; past the model's table they would fail deep inside torch."""
    limit = getattr(model_config, "max_position_embeddings", None) or getattr(model_config, "n_positions", None)
    if limit is not None and num_virtual_tokens + positions > limit:
        raise AdapterError(
            f"num_virtual_tokens={num_virtual_tokens} + {positions} input positions = "
            f"{num_virtual_tokens + positions} exceeds the model's max_position_embeddings={limit}; "
            "use fewer virtual tokens or shorter inputs"
        )


def extend_attention_mask(inputs: BackboneInputs, num_virtual_tokens: int, virtual_queries: bool) -> None:
    """Every real token attends to the virtual positions; the caller's mask covers only the real tokens.

    A 2D (batch, tokens) mask gets leading ones. A prepared 4D mask (packed rows: block-diagonal,
    additive or boolean) gets leading "attend" key columns and, when the virtual tokens are computed in
    this call (``virtual_queries``), leading query rows in which they attend causally among themselves.
    """
    mask = inputs.get("attention_mask")
    if mask is None:
        return
    if mask.dim() == 2:
        inputs["attention_mask"] = torch.cat([mask.new_ones((mask.shape[0], num_virtual_tokens)), mask], dim=1)
        return
    if mask.dim() != 4:
        raise AdapterError(f"virtual-token adapters need a 2D or 4D attention_mask, got shape {tuple(mask.shape)}")
    attend, block = (True, False) if mask.dtype == torch.bool else (0.0, torch.finfo(mask.dtype).min)
    batch, heads, queries, keys = mask.shape
    columns = torch.full((batch, heads, queries, num_virtual_tokens), attend, dtype=mask.dtype, device=mask.device)
    extended = torch.cat([columns, mask], dim=-1)
    if virtual_queries:
        rows = torch.full((batch, heads, num_virtual_tokens, num_virtual_tokens + keys), block,
                          dtype=mask.dtype, device=mask.device)
        causal = torch.ones(num_virtual_tokens, num_virtual_tokens, dtype=torch.bool, device=mask.device).tril()
        rows[..., :num_virtual_tokens] = torch.where(causal, attend, block).to(mask.dtype)
        extended = torch.cat([rows, extended], dim=-2)
    inputs["attention_mask"] = extended


def shift_position_ids(inputs: BackboneInputs, num_virtual_tokens: int, prepend: bool) -> None:
    """Real tokens come after the virtual ones: shift given positions, and give prepended tokens 0..n-1."""
    positions = inputs.get("position_ids")
    if positions is None:
        return  # the backbone counts from the cache length, which already includes the virtual tokens
    shifted = positions + num_virtual_tokens
    if prepend:
        leading = torch.arange(num_virtual_tokens, device=positions.device, dtype=positions.dtype)
        shifted = torch.cat([leading.expand(*positions.shape[:-1], num_virtual_tokens), shifted], dim=-1)
    inputs["position_ids"] = shifted


def drop_leading_positions(count: int) -> Finisher:
    """Remove the virtual positions from the backbone's hidden states so outputs align with the input ids."""
    def finish(output):
        if isinstance(output, tuple):
            return (output[0][:, count:], *output[1:])
        output.last_hidden_state = output.last_hidden_state[:, count:]
        if getattr(output, "hidden_states", None) is not None:
            output.hidden_states = tuple(h[:, count:] for h in output.hidden_states)
        return output
    return finish


# --- PEFT files (called from peft_format.py) ---

def model_adapter_state(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    return {key: tensor for adapter_name, adapter in model_adapters(model) if adapter_name == name
            for key, tensor in adapter.file_tensors().items()}


def model_adapter_peft_fields(model: nn.Module, name: str) -> dict[str, Any]:
    """Config fields PEFT derives from the model (token_dim, num_layers, ...), written for its loader."""
    return {key: value for adapter_name, adapter in model_adapters(model) if adapter_name == name
            for key, value in adapter.peft_fields().items()}


def load_model_adapter_tensors(model: nn.Module, name: str, remaining: dict[str, torch.Tensor], path: Any) -> None:
    """Take adapter ``name``'s tensors out of ``remaining`` (the file's tensors), checking names and shapes."""
    for adapter_name, adapter in model_adapters(model):
        if adapter_name != name:
            continue
        own = {}
        for key, target in adapter.file_tensors().items():
            if key not in remaining:
                raise AdapterError(f"{path}: adapter file has no tensor '{key}' (expected shape {tuple(target.shape)})")
            if remaining[key].shape != target.shape:
                raise AdapterError(
                    f"{path}: tensor '{key}' has shape {tuple(remaining[key].shape)} in the adapter file but "
                    f"{tuple(target.shape)} in this model: the adapter was made for a different base model or "
                    "num_virtual_tokens; load it onto the model it was trained on"
                )
            own[key] = remaining.pop(key)
        adapter.load_file_tensors(own)


def text_config(model: nn.Module) -> Any:
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def attention_shape(config: Any) -> tuple[int, int, int]:
    """(decoder layers, key/value heads, head dim) of a decoder's (text) config; GQA models have fewer kv heads."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


def decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(module path from the model, module) of each decoder layer, in order (Llama ``layers``, GPT-2 ``h``)."""
    backbone = backbone_of(model)
    paths = {module: path for path, module in model.named_modules()}
    for attribute in ("layers", "h"):
        layers = getattr(backbone, attribute, None)
        if isinstance(layers, nn.ModuleList):
            return [(paths[layer], layer) for layer in layers]
    raise AdapterError(f"{type(backbone).__name__} has no decoder layer list ('layers' or 'h')")


def check_layer_indices(indices: list[int], count: int, key: str) -> None:
    bad = [i for i in indices if not 0 <= i < count]
    if bad:
        raise AdapterError(f"{key}={bad} names layers this model does not have; valid layer indices are 0..{count - 1}")


# --- checkpoints of reparameterised methods (MethodSpec.hooks) ---

class TrainingFormHooks(TrainingHooks):
    """Resume for methods whose files hold only the output of a trained reparameterisation (prefix
    projection, P-tuning encoders): the checkpoint also keeps the reparameterisation, and resuming puts
    it back after the adapter file replaced it by its output, with the same parameter objects the
    optimizer was built on."""

    def __init__(self, adapter: ModelAdapter, form: nn.Module):
        self.adapter, self.form = adapter, form

    def state_dict(self) -> dict:
        return {"training_form": {k: v.detach().cpu().clone() for k, v in self.form.state_dict().items()}}

    def load_state_dict(self, state: dict) -> None:
        if "training_form" in state:
            self.form.load_state_dict(state["training_form"])
            self.adapter.restore_training_form(self.form)


def training_form_hooks(model: nn.Module, name: str, config: AdapterConfig) -> TrainingFormHooks | None:
    adapter = dict(model_adapters(model))[name]
    form = adapter.training_form()
    return TrainingFormHooks(adapter, form) if form is not None else None
