"""Calibration for the data-driven inits: look at a few batches, then set A and B.

CorDA needs the second moment (Gram matrix) of each target layer's inputs, EVA their covariance (the
Gram matrix centred by the inputs' mean), LoRA-GA the gradient
of the loss with respect to each target layer's full weight. Both are collected with the adapters
disabled and the model in eval mode, so the statistics are those of the base model and the result
is a pure function of (model, batches): a resumed run that re-runs the init gets the same start.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from tuneforge.adapters.config import LoraConfig
from tuneforge.adapters.hooks import Batch, LossFn
from tuneforge.adapters.lora.inits.corda import corda_factors
from tuneforge.adapters.lora.inits.eva import allocate_ranks, centred, eva_components, rank_cap, scaled_alpha
from tuneforge.adapters.lora.inits.lora_ga import lora_ga_factors
from tuneforge.adapters.lora.inits.residual import InitialisedLoraLinear
from tuneforge.adapters.layer import AdaptedLayer
from tuneforge.adapters.lora.lora import is_transposed
from tuneforge.adapters.model import adapter_book, disabled_adapters, wrapped_layers
from tuneforge.errors import AdapterError, ConfigError, DataError

DATA_DRIVEN_INITS = ("corda", "lora-ga", "eva")
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


def initialize_lora(model: nn.Module, adapter_name: str, batches: Iterable[Batch] | None,
                    loss_fn: LossFn | None = None) -> None:
    """Run adapter ``adapter_name``'s data-driven init (corda, lora-ga, eva) on ``batches``.

    ``batches`` are dicts with ``input_ids`` (and optionally ``attention_mask``, ``labels``), on the
    model's device. ``loss_fn(model, batch) -> scalar`` is used by lora-ga; the default is the
    model's own causal-LM loss on ``labels`` (or on ``input_ids``). Inits that need no data
    (kaiming, gaussian, pissa, olora, loftq) are already done by ``add_adapter``: nothing happens.
    """
    config = _lora_config(model, adapter_name)
    if config.init not in DATA_DRIVEN_INITS:
        return
    batches = _checked_batches(batches, config.init, adapter_name)
    layers = {name: layer for name, layer in wrapped_layers(model) if adapter_name in layer.adapters}
    if any(adapter_name in layer.merged for layer in layers.values()):
        raise AdapterError(f"adapter '{adapter_name}' is merged into the base weights; unmerge_adapters(model) "
                           "before initialize_lora, which replaces its A and B")
    with _calibration_mode(model):
        if config.init == "lora-ga":
            gradients = collect_weight_gradients(model, layers, batches, loss_fn or causal_lm_loss)
        else:
            grams, means = collect_input_moments(model, layers, batches)
    if config.init == "corda":
        for name, layer in layers.items():
            adapter = layer.adapters[adapter_name]
            lora_A, lora_B = corda_factors(base_weight(layer), grams[name], adapter.r, adapter.scaling,
                                           config.corda_mode)
            adapter.start_from(lora_A, lora_B, residual=True)
    elif config.init == "lora-ga":
        for name, layer in layers.items():
            adapter = layer.adapters[adapter_name]
            lora_A, lora_B = lora_ga_factors(gradients[name], adapter.r, config.lora_ga_gamma)
            adapter.start_from(lora_A, lora_B, residual=True)
    else:
        _apply_eva(model, adapter_name, config, layers, {name: centred(grams[name], means[name]) for name in layers})


def _lora_config(model: nn.Module, adapter_name: str) -> LoraConfig:
    configs = adapter_book(model).configs
    if adapter_name not in configs:
        raise AdapterError(f"no adapter named '{adapter_name}' to initialise; "
                           f"the model has {list(configs) or 'no adapters'}")
    config = configs[adapter_name]
    if not isinstance(config, LoraConfig):
        raise AdapterError(f"initialize_lora needs a LoRA adapter; '{adapter_name}' is method={config.method}")
    return config


def _checked_batches(batches, init: str, adapter_name: str) -> list[Batch]:
    batches = list(batches) if batches is not None else []
    if not batches:
        raise ConfigError(
            f"adapter '{adapter_name}' uses init={init}, which is computed from calibration data, but no "
            "batches were given. Pass a few tokenized batches (dicts with input_ids, optionally "
            "attention_mask and labels) to initialize_lora, or train with tuneforge, which passes its first "
            "`training.init_batches` batches; or choose a data-free init (kaiming, pissa, olora)."
        )
    for index, batch in enumerate(batches):
        if not isinstance(batch, dict) or "input_ids" not in batch:
            found = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
            raise DataError(f"calibration batch {index} for init={init} must be a dict with 'input_ids'; got {found}")
    return batches


@contextlib.contextmanager
def _calibration_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with disabled_adapters(model):
            yield
    finally:
        model.train(was_training)


def base_weight(layer: AdaptedLayer) -> torch.Tensor:
    """The base layer's W as (out, in) float32, whatever its storage layout."""
    return _out_in(layer, layer.base_layer.weight.detach().float())


def causal_lm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    inputs = {key: batch[key] for key in MODEL_INPUTS if key in batch}
    return model(**inputs, labels=batch.get("labels", batch["input_ids"])).loss


def collect_input_grams(model: nn.Module, layers: dict[str, AdaptedLayer],
                        batches: list[Batch]) -> dict[str, torch.Tensor]:
    """Per layer, the mean of x xᵀ over the non-padding positions of ``batches``: (in, in) float32."""
    return collect_input_moments(model, layers, batches)[0]


def collect_input_moments(model: nn.Module, layers: dict[str, AdaptedLayer],
                          batches: list[Batch]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per layer, the mean of x xᵀ (in, in) and the mean of x (in,) over the non-padding positions, float32."""
    grams: dict[str, torch.Tensor] = {}
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(layers, 0)
    current_mask: list[torch.Tensor | None] = [None]

    def recorder(name: str):
        def record(module, args):
            rows = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # (tokens, in)
            mask = current_mask[0]
            if mask is not None and mask.numel() == rows.shape[0]:
                rows = rows[mask.reshape(-1).to(rows.device).bool()]
            gram, total = rows.T @ rows, rows.sum(0)
            grams[name] = gram if name not in grams else grams[name] + gram
            sums[name] = total if name not in sums else sums[name] + total
            counts[name] += rows.shape[0]
        return record

    handles = [layer.register_forward_pre_hook(recorder(name)) for name, layer in layers.items()]
    try:
        with torch.no_grad():
            for batch in batches:
                current_mask[0] = batch.get("attention_mask")
                model(**{key: batch[key] for key in MODEL_INPUTS if key in batch})
    finally:
        for handle in handles:
            handle.remove()
    return ({name: grams[name] / max(1, counts[name]) for name in layers},
            {name: sums[name] / max(1, counts[name]) for name in layers})


def collect_weight_gradients(model: nn.Module, layers: dict[str, AdaptedLayer], batches: list[Batch],
                             loss_fn: LossFn) -> dict[str, torch.Tensor]:
    """Per layer, d loss / d W averaged over ``batches``, as (out, in) float32."""
    weights = {}
    for name, layer in layers.items():
        weight = layer.base_layer.weight
        if not isinstance(weight, nn.Parameter):
            raise AdapterError(
                f"init=lora-ga needs the gradient of '{name}''s full weight, but its base layer "
                f"({type(layer.base_layer).__name__}) stores no trainable weight (a quantized layer?). Add the "
                "adapter to the full-precision model, or pick another init."
            )
        weights[name] = weight
    flags = {name: weight.requires_grad for name, weight in weights.items()}
    sums = {}
    try:
        for weight in weights.values():
            weight.requires_grad_(True)
            weight.grad = None
        for batch in batches:
            loss_fn(model, batch).backward()
            for name, weight in weights.items():
                # A layer the loss does not reach (e.g. behind a detach) gets no gradient at all.
                grad = torch.zeros_like(weight, dtype=torch.float32) if weight.grad is None else weight.grad.float()
                sums[name] = grad if name not in sums else sums[name] + grad
                weight.grad = None
    finally:
        for name, weight in weights.items():
            weight.requires_grad_(flags[name])
            weight.grad = None
    for parameter in model.parameters():
        parameter.grad = None  # nothing of the calibration pass may leak into the first optimizer step
    return {name: _out_in(layers[name], sums[name] / len(batches)) for name in layers}


def _out_in(layer: AdaptedLayer, tensor: torch.Tensor) -> torch.Tensor:
    return tensor.T if is_transposed(layer.base_layer) else tensor


def _apply_eva(model: nn.Module, adapter_name: str, config: LoraConfig, layers: dict[str, AdaptedLayer],
               covariances: dict[str, torch.Tensor]) -> None:
    """A0 = top input directions, with ranks redistributed across layers (rank 0: the layer is left
    unadapted); B0 = 0."""
    ratios, components, ranks = {}, {}, {}
    for name, layer in layers.items():
        adapter = layer.adapters[adapter_name]
        ranks[name] = adapter.r
        cap = rank_cap(adapter.r, config.eva_rho, adapter.lora_A.shape[1])
        ratios[name], components[name] = eva_components(covariances[name], cap)
    allocated = allocate_ranks(ratios, ranks)
    alphas = {}
    for name, layer in layers.items():
        if allocated[name] == 0:
            _remove_from_layer(model, name, layer, adapter_name)
            continue
        adapter = layer.adapters[adapter_name]
        alphas[name] = config.alpha_for(name)
        if allocated[name] != adapter.r:
            alphas[name] = scaled_alpha(alphas[name], allocated[name], adapter.r)
            adapter = _resized(adapter, allocated[name], alphas[name], config, name)
            layer.adapters[adapter_name] = adapter
        rows = components[name][: adapter.r]
        adapter.start_from(rows, torch.zeros(adapter.lora_B.shape[0], adapter.r), residual=False)
    # Saving and reloading must rebuild the same shapes: record the new ranks and scales (ahead of older
    # patterns) and exclude the layers that ended with rank 0.
    kept = [name for name in layers if allocated[name] > 0]
    rank_changes = {name: allocated[name] for name in kept if allocated[name] != config.rank_for(name)}
    alpha_changes = {name: alphas[name] for name in kept if alphas[name] != config.alpha_for(name)}
    dropped = [name for name in layers if allocated[name] == 0]
    adapter_book(model).configs[adapter_name] = config.model_copy(update={
        "rank_pattern": {**rank_changes, **{k: v for k, v in config.rank_pattern.items() if k not in rank_changes}},
        "alpha_pattern": {**alpha_changes, **{k: v for k, v in config.alpha_pattern.items() if k not in alpha_changes}},
        "exclude_modules": _excluding(config.exclude_modules, dropped),
    })


def _remove_from_layer(model: nn.Module, name: str, layer: AdaptedLayer, adapter_name: str) -> None:
    """Take the adapter off one layer (EVA gave it rank 0); a wrapper left empty becomes the base layer."""
    del layer.adapters[adapter_name]
    if not layer.adapters:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.base_layer)


def _excluding(exclude_modules, names: list[str]):
    """``exclude_modules`` extended by the full module ``names`` (a regex gets an alternation)."""
    if not names:
        return exclude_modules
    if isinstance(exclude_modules, str):
        return "|".join([f"(?:{exclude_modules})", *(re.escape(name) for name in names)])
    return [*(exclude_modules or []), *names]


def _resized(old: InitialisedLoraLinear, rank: int, alpha: float, config: LoraConfig, name: str) -> InitialisedLoraLinear:
    new = InitialisedLoraLinear(old.lora_A.shape[1], old.lora_B.shape[0], rank, alpha,
                                config.dropout, config.use_rslora, old.transposed, old.init, name)
    new = new.to(device=old.lora_A.device, dtype=old.lora_A.dtype).train(old.training)
    return new.requires_grad_(old.lora_A.requires_grad)
