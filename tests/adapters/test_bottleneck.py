"""Bottleneck adapters against a naive re-implementation: plain modules spliced into a model copy."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from tiny_models import perturb_trainable, sample_ids, tiny_gpt2, tiny_llama

from tuneforge.adapters import add_adapter, merge_adapters
from tuneforge.adapters.selective.bottleneck import BottleneckConfig
from tuneforge.adapters.layer import AdaptedLayer
from tuneforge.errors import AdapterError

ACT = {"relu": torch.relu, "gelu": nn.functional.gelu, "silu": nn.functional.silu, "tanh": torch.tanh}


class NaiveSerial(nn.Module):
    """h = block(x); h + W_up act(W_down h + b_down) + b_up, first element only for tuple outputs."""

    def __init__(self, block, params, act, parallel=False, scaling=1.0):
        super().__init__()
        self.block, self.params, self.act, self.parallel, self.scaling = block, params, act, parallel, scaling

    def forward(self, x, *args, **kwargs):
        out = self.block(x, *args, **kwargs)
        h = out[0] if isinstance(out, tuple) else out
        p = self.params
        source = x if self.parallel else h
        added = h + self.scaling * (ACT[self.act](source @ p["adapter_down.weight"].T + p["adapter_down.bias"])
                                    @ p["adapter_up.weight"].T + p["adapter_up.bias"])
        return (added, *out[1:]) if isinstance(out, tuple) else added


def naive_copy(base, adapted, act, parallel=False, scaling=1.0):
    """A copy of ``base`` with NaiveSerial around every module the adapter wrapped, same weights."""
    naive = copy.deepcopy(base)
    for name, module in adapted.named_modules():
        if isinstance(module, AdaptedLayer):
            params = {k: v.detach().clone() for k, v in module.adapters["default"].named_parameters()}
            parent, _, child = name.rpartition(".")
            holder = naive.get_submodule(parent)
            setattr(holder, child, NaiveSerial(getattr(holder, child), params, act, parallel, scaling))
    return naive


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


CASES = [
    ("llama-houlsby", tiny_llama, dict(placement="houlsby", reduction_factor=4, non_linearity="relu"), 4),
    ("llama-pfeiffer", tiny_llama, dict(placement="pfeiffer", reduction_factor=8, non_linearity="tanh"), 2),
    ("llama-parallel", tiny_llama, dict(placement="parallel", reduction_factor=4, non_linearity="silu", scaling=4.0), 2),
    ("gpt2-houlsby", tiny_gpt2, dict(placement="houlsby", reduction_factor=4, non_linearity="gelu"), 4),
    # GPT-2 calls its attention positionally, so the whole tuple-returning module can be wrapped.
    ("gpt2-whole-attention", tiny_gpt2, dict(target_modules=["attn"], reduction_factor=2, non_linearity="relu"), 2),
]


@pytest.mark.parametrize("case_id,make_model,kwargs,wrapped", CASES, ids=[c[0] for c in CASES])
def test_matches_naive_reimplementation(case_id, make_model, kwargs, wrapped):
    base = make_model()
    model = copy.deepcopy(base)
    targets = add_adapter(model, BottleneckConfig(**kwargs))
    assert len(targets) == wrapped
    perturb_trainable(model, scale=0.3)
    config = BottleneckConfig(**kwargs)
    naive = naive_copy(base, model, config.non_linearity, config.placement == "parallel", config.scaling)
    ids = sample_ids()
    ours = logits(model, ids)
    torch.testing.assert_close(ours, logits(naive, ids), atol=1e-5, rtol=1e-4)
    assert (ours - logits(base, ids)).abs().max() > 1e-3


def test_placements_pick_the_right_blocks():
    targets = add_adapter(tiny_llama(), BottleneckConfig(placement="houlsby"))
    assert targets == ["model.layers.0.self_attn.o_proj", "model.layers.0.mlp",
                       "model.layers.1.self_attn.o_proj", "model.layers.1.mlp"]
    assert add_adapter(tiny_gpt2(), BottleneckConfig(placement="pfeiffer")) == ["transformer.h.0.mlp", "transformer.h.1.mlp"]


def test_sizes_follow_the_reduction_factor():
    model = tiny_llama()
    add_adapter(model, BottleneckConfig(placement="pfeiffer", reduction_factor=8))
    adapter = model.model.layers[0].mlp.adapters["default"]
    assert adapter.adapter_down.weight.shape == (4, 32) and adapter.adapter_up.weight.shape == (32, 4)
    assert not adapter.adapter_up.weight.any() and not adapter.adapter_up.bias.any()
    with pytest.raises(AdapterError, match="reduction_factor=64 leaves no bottleneck"):
        add_adapter(tiny_llama(), BottleneckConfig(reduction_factor=64))


def test_merge_is_refused_and_the_base_is_untouched():
    base = tiny_llama()
    model = copy.deepcopy(base)
    add_adapter(model, BottleneckConfig())
    perturb_trainable(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterError, match="cannot be merged"):
        merge_adapters(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not m.merged for m in model.modules() if isinstance(m, AdaptedLayer))
