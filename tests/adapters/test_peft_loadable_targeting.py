"""Adapter files peft loads whatever the targeting (issue 15, part 3b).

peft's configs refuse a string target_modules (a regex or ``all-linear``) beside layers_to_transform
or layers_pattern, and layers_pattern alone; the demo's adapter paired ``all-linear`` with layers
14-29 and did not load in peft. The oracle is peft itself: ``PeftModel.from_pretrained`` on the saved
folder must give our logits.

- Every ``examples/**/*.yaml`` that trains an adapter, with its own adapter settings, on a tiny random
  model with the module names of the example's base model.
- Every case of the adapter table (cases.py) that peft knows, retargeted by a regex with layer selection.
"""

from __future__ import annotations

import copy
import json
import re
import warnings
from pathlib import Path

import peft
import pytest
import torch
from cases import CASES
from peft_roundtrip import assert_peft_loads_ours
from tiny_models import perturb_trainable, tiny_gpt2, tiny_llama
from torch import nn

from tuneforge.adapters import LoraConfig, add_adapter, save_adapter
from tuneforge.adapters.peft_format import CONFIG_FILE
from tuneforge.adapters.registry import get_method
from tuneforge.config.overrides import load_config_file
from tuneforge.config.schema import parse_train_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
# Examples that train an adapter; full finetunes (FedKSeed's example) write a model, not a PEFT adapter.
TRAINING_EXAMPLES = sorted(path for path in EXAMPLES.rglob("*.yaml")
                           if (load_config_file(path).get("adapter") or {}).get("method", "lora") != "full"
                           and "adapter" in load_config_file(path))
SMALLEST_EXAMPLE_RANK = 8


def tiny_smollm2():
    """SmolLM2-135M's module names (LlamaForCausalLM, 30 decoder layers, tied embeddings), tiny widths."""
    return tiny_llama(num_hidden_layers=30, tie_word_embeddings=True)


# The base models the examples name -> a tiny random model with the same module names.
TINY_STAND_INS = {"smollm2-135m": tiny_smollm2}


def with_low_rank_linear_weights(model: nn.Module, rank: int = SMALLEST_EXAMPLE_RANK // 2) -> nn.Module:
    """Give every Linear weight rank ``rank``, below every example's r.

    A residual init (PiSSA) rebuilds W - B0 A0 on load; with pissa_niter peft runs a randomized SVD
    seeded from the global RNG, ours from a fixed seed. On a weight of rank < r both find its whole
    range, so the residuals agree and the comparison checks the file, not two random draws.
    """
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                out_features, in_features = module.weight.shape
                left = torch.randn(out_features, rank, generator=generator)
                right = torch.randn(rank, in_features, generator=generator)
                module.weight.copy_(left @ right / (rank * in_features) ** 0.5)
    return model


@pytest.mark.parametrize("example", TRAINING_EXAMPLES, ids=lambda path: str(path.relative_to(EXAMPLES)))
def test_the_adapter_of_every_example_loads_in_peft_with_equal_logits(example, tmp_path, one_torch_thread):
    data = load_config_file(example)
    data.pop("federated", None)  # a federated config trains the same adapter on each client
    config = parse_train_config(data, source=str(example))
    assert config.model in TINY_STAND_INS, f"{example}: add a tiny stand-in for {config.model!r} to this test"
    assert getattr(config.adapter, "r", SMALLEST_EXAMPLE_RANK) >= SMALLEST_EXAMPLE_RANK
    base = with_low_rank_linear_weights(TINY_STAND_INS[config.model]())
    assert_peft_loads_ours(base, config.adapter, tmp_path, atol=1e-5)


def test_the_demo_adapter_lists_the_modules_all_linear_resolved_to(tmp_path):
    config = parse_train_config(load_config_file(EXAMPLES / "demo.yaml"))
    model = tiny_smollm2()
    add_adapter(model, config.adapter)
    save_adapter(model, tmp_path)
    written = json.loads((tmp_path / CONFIG_FILE).read_text())
    # as peft saves an all-linear config: the leaf names, with the layer selection beside them
    assert sorted(written["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj",
                                                 "up_proj", "v_proj"]
    assert written["layers_to_transform"] == list(range(14, 30))


def test_leaf_names_that_would_reach_other_modules_are_written_as_full_names(tmp_path):
    # GPT-2 has c_proj in attention and in the MLP; the regex wants attention's only
    base = tiny_gpt2()
    config = LoraConfig(r=4, target_modules=r".*\.attn\.c_proj", layers_to_transform=[1], layers_pattern="h",
                        fan_in_fan_out=True)
    assert_peft_loads_ours(base, config, tmp_path)
    written = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert written["target_modules"] == ["transformer.h.1.attn.c_proj"]


def test_layers_pattern_without_layer_indices_is_left_out(tmp_path):
    # it selects nothing on its own (tuneforge and peft alike); peft refuses it without layers_to_transform
    config = LoraConfig(r=4, target_modules=["q_proj"], layers_pattern="layers")
    assert_peft_loads_ours(tiny_llama(), config, tmp_path)
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["layers_pattern"] is None


def as_regex(targets) -> str:
    """The same modules as a list of names or suffixes, as one regex over the whole module name."""
    if isinstance(targets, str):
        return targets
    return r"(.*\.)?(" + "|".join(re.escape(entry) for entry in targets) + ")"


def retargeted_by_regex_and_layer(case):
    """The case's config with its targets as a regex and only layer 1 adapted (both tiny models have 2)."""
    config = case.make_config()
    update = dict(target_modules=as_regex(config.target_modules), layers_to_transform=[1],
                  layers_pattern="h" if case.make_model is tiny_gpt2 else "layers")
    if "total_step" in type(config).model_fields:  # AdaLoRA: training records it; peft requires it
        update["total_step"] = 10
    return config.model_copy(update=update)


CONV1D_UNSUPPORTED = "peft wraps only nn.Linear (and Conv2d) for this method, not GPT-2's Conv1D"
# Cases peft cannot load whatever their targeting; here their configs are still checked by peft.
PEFT_CANNOT_LOAD = {
    "road-2-gpt2-conv1d-bias": CONV1D_UNSUPPORTED, "shira-gpt2-conv1d": CONV1D_UNSUPPORTED,
    "oft-gpt2-conv1d": CONV1D_UNSUPPORTED, "boft-gpt2-conv1d-bias": CONV1D_UNSUPPORTED,
    "hra-gpt2-conv1d": CONV1D_UNSUPPORTED,
    "olora-gpt2-conv1d": "peft's olora_init ignores fan_in_fan_out on Conv1D (test_lora_inits_peft.py)",
    "pissa-niter-llama-dropout": "peft's randomized SVD draws from the global RNG (test_lora_inits_peft.py)",
    "boft-llama-butterfly": "peft 0.21.2 without its CUDA extension keeps one butterfly factor (test_boft.py)",
    "shira-llama-density": "random_seed=None is written as null and peft's random mask multiplies it",
    "shira-llama-magnitude": "peft rebuilds only the random mask on load, so it has no magnitude-mask indices",
}
OUTSIDE_THE_LAYERS = ("trainable-tokens",)  # embeddings and heads: no layer to select


def peft_layer_cases():
    cases = []
    for case in CASES:
        config = case.make_config()
        if get_method(config.method).config_class.peft_type is None or config.target_modules is None:
            continue  # peft has no such method, or it is model-level (no targeting)
        if not case.id.startswith(OUTSIDE_THE_LAYERS):
            cases.append(case)
    return cases


@pytest.mark.parametrize("case", peft_layer_cases(), ids=lambda case: case.id)
def test_every_peft_method_targeted_by_a_regex_and_layers_passes_peft_and_loads(case, tmp_path, one_torch_thread):
    base = case.make_model()
    config = retargeted_by_regex_and_layer(case)
    model = copy.deepcopy(base)
    add_adapter(model, config)
    save_adapter(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        written = peft.PeftConfig.from_pretrained(tmp_path)  # runs the config class's own checks
    assert not isinstance(written.target_modules, str)
    if case.id in PEFT_CANNOT_LOAD:
        pytest.skip(f"config accepted; peft cannot load {case.id} at all: {PEFT_CANNOT_LOAD[case.id]}")
    assert_peft_loads_ours(base, config, tmp_path, atol=case.atol)


def test_all_norms_is_written_as_the_norms_it_chose(tmp_path):
    # a tuneforge keyword: peft would read it as a regex matching nothing
    config = get_method("ln-tuning").config_class(target_modules="all-norms")
    assert_peft_loads_ours(tiny_llama(), config, tmp_path)
    written = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert sorted(written["target_modules"]) == ["input_layernorm", "norm", "post_attention_layernorm"]


class TopLevelLayers(nn.Module):
    """Layers at the top of the module tree (``layers.1.q_proj``): peft finds a layer index only after
    a first dotted segment, so with layers_to_transform it would adapt none of them."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.ModuleDict({"q_proj": nn.Linear(8, 8)}) for _ in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer["q_proj"](x))
        return x


def test_a_list_with_layers_that_peft_would_index_differently_is_written_as_full_names(tmp_path):
    base = TopLevelLayers().eval()
    model = copy.deepcopy(base)
    add_adapter(model, LoraConfig(r=2, target_modules=["q_proj"], layers_to_transform=[1]))
    perturb_trainable(model)
    save_adapter(model, tmp_path)
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["target_modules"] == ["layers.1.q_proj"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), model(x), rtol=0, atol=1e-6)
        assert not torch.allclose(model(x), base(x))  # the adapter does something
