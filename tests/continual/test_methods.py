"""Each continual method against its paper's equation (written out here) and against plain sequential
LoRA: a behaviour sequential finetuning does not have."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
import yaml
from helpers import quiet, stream_config, tiny
from safetensors.torch import load_file

from tuneforge.adapters import add_adapter
from tuneforge.adapters.config import LoraConfig
from tuneforge.adapters.peft_format import load_adapter
from tuneforge.continual import run_continual
from tuneforge.continual.config import parse_continual_config
from tuneforge.continual.methods import Stage, StreamContext, build_method
from tuneforge.continual.methods.ewc import EwcPenalty
from tuneforge.continual.methods.inflora import designed_down_projection, grow_basis
from tuneforge.continual.methods.lora_layers import fold_in
from tuneforge.continual.methods.merging import add_deltas, merged_deltas
from tuneforge.continual.methods.migu import top_mask
from tuneforge.continual.methods.olora import orthogonality_loss
from tuneforge.continual.methods.replay import reservoir_sample
from tuneforge.continual.methods.routing import routed
from tuneforge.continual.tasks import load_tasks
from tuneforge.errors import ConfigError

SMALL = {"train_size": 8, "eval_size": 1, "max_new_tokens": 1, "probe": {"data": "bundled", "size": 1}}


class Runs:
    """Streams run once per module and shared by the tests that read them."""

    def __init__(self, root):
        self.root, self.done = root, {}

    def __call__(self, key, method, tasks=("unit_conversion", "string_reversal")):
        if key not in self.done:
            config = stream_config(self.root / key, method, tasks=tasks, **SMALL)
            run_continual(config, model_and_tokenizer=tiny(), say=quiet)
            self.done[key] = self.root / key / "stream"
        return self.done[key]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return Runs(tmp_path_factory.mktemp("streams"))


def adapter_tensors(stream, stage):
    folder = next((stream / "stages").glob(f"{stage:02d}-*"))
    return load_file(folder / "adapter" / "adapter_model.safetensors")


def stage_dir(stream, stage):
    return next((stream / "stages").glob(f"{stage:02d}-*"))


def method_state(stream, stage):
    return torch.load(stage_dir(stream, stage) / "method_state.pt", weights_only=True)


def pairs(tensors, leaf):
    return {key[: -len(leaf)]: value for key, value in tensors.items() if key.endswith(leaf)}


# -- replay ------------------------------------------------------------------------------------

def test_reservoir_keeps_every_item_with_equal_probability():
    hits = [0] * 20
    for seed in range(3000):
        for item in reservoir_sample(list(range(20)), 5, random.Random(seed)):
            hits[item] += 1
    assert all(abs(count / 3000 - 5 / 20) < 0.04 for count in hits), hits  # K/N for early and late items alike
    assert reservoir_sample([1, 2], 5, random.Random(0)) == [1, 2]


def test_replay_adds_a_share_of_earlier_tasks_to_each_task(tmp_path):
    config, train_config = parse_continual_config({**stream_config(tmp_path, {"name": "replay", "fraction": 0.25}), **SMALL})
    tasks = load_tasks(config)
    method = build_method(config.method, StreamContext(tmp_path, tasks, train_config, 0))
    first, second = (method.training_examples(Stage(i, (i,), tmp_path)) for i in (0, 1))
    assert first == tasks[0].train  # nothing earlier to replay
    replayed = second[len(tasks[1].train):]
    assert second[: len(tasks[1].train)] == tasks[1].train
    assert len(replayed) == math.ceil(0.25 * len(tasks[0].train)) and all(e in tasks[0].train for e in replayed)
    with pytest.raises(ConfigError, match=r"method.fraction.*(less than or equal|greater than)"):
        build_method({"name": "replay", "fraction": 2}, StreamContext(tmp_path, tasks, train_config, 0))


# -- EWC ---------------------------------------------------------------------------------------

def test_ewc_penalty_is_kirkpatricks_eq3():
    theta = {"a": torch.nn.Parameter(torch.tensor([1.0, 2.0])), "b": torch.nn.Parameter(torch.tensor([[0.5]]))}
    tasks = [{"anchor": {"a": torch.tensor([0.0, 2.5]), "b": torch.tensor([[0.0]])},
              "fisher": {"a": torch.tensor([2.0, 4.0]), "b": torch.tensor([[8.0]])}},
             {"anchor": {"a": torch.tensor([1.0, 1.0]), "b": torch.tensor([[1.0]])},
              "fisher": {"a": torch.tensor([1.0, 1.0]), "b": torch.tensor([[0.0]])}}]
    # λ/2 [2·1² + 4·0.5² + 8·0.5²] + λ/2 [0 + 1·1² + 0] with λ = 10
    expected = 5 * (2 + 1 + 2) + 5 * 1
    assert EwcPenalty(theta, tasks, 10.0).extra_loss(None).item() == pytest.approx(expected)


def test_ewc_keeps_the_important_adapter_weights_closer_than_sequential(runs):
    sequential = runs("sequential", {"name": "sequential"})
    ewc = runs("ewc", {"name": "ewc", "strength": 1e6, "fisher_examples": 4})
    state = method_state(ewc, 1)["consolidated"][0]
    fisher = {key.split(".adapters.default.")[0] + "." + key.rsplit(".", 1)[1]: value for key, value in state["fisher"].items()}

    def weighted_drift(stream):
        first, second = adapter_tensors(stream, 1), adapter_tensors(stream, 2)
        total = 0.0
        for key in first:
            module = key.removeprefix("base_model.model.").replace(".weight", "")
            total += float((fisher[module] * (second[key] - first[key]) ** 2).sum())
        return total

    assert sum(float(f.sum()) for f in state["fisher"].values()) > 0
    assert weighted_drift(ewc) < 0.5 * weighted_drift(sequential)


# -- O-LoRA ------------------------------------------------------------------------------------

def test_orthogonality_loss_is_the_sum_of_squared_entries_of_a_i_a_t():
    earlier, current = torch.randn(3, 7), torch.randn(2, 7)
    by_entry = sum(float(earlier[j] @ current[k]) ** 2 for j in range(3) for k in range(2))
    assert orthogonality_loss(earlier, current).item() == pytest.approx(by_entry, rel=1e-5)


def test_olora_trains_a_new_lora_orthogonal_to_the_earlier_one(runs):
    olora = runs("olora", {"name": "olora", "orthogonality": 1e3})
    plain = runs("merge", {"name": "merge", "merge_method": "task_arithmetic"})  # a new LoRA per task, no penalty

    def overlap(stream):
        first, second = pairs(adapter_tensors(stream, 1), "lora_A.weight"), pairs(adapter_tensors(stream, 2), "lora_A.weight")
        return sum(float(((first[k] @ second[k].T) ** 2).sum()) for k in first)

    assert overlap(olora) < 0.8 * overlap(plain)  # both start from the same A_2 init; two steps apart
    config = yaml.safe_load((stage_dir(olora, 2) / "config.yaml").read_text())
    assert config["training"]["init_adapter"] is None  # a new LoRA, not the previous one continued


def test_fold_in_adds_the_earlier_loras_to_the_base(runs):
    stream = runs("merge", {"name": "merge", "merge_method": "task_arithmetic"})
    base, _ = tiny()
    reference = {name: p.detach().clone() for name, p in base.named_parameters()}
    folded = fold_in(base, [stage_dir(stream, 1) / "adapter"])
    tensors = adapter_tensors(stream, 1)
    saved = json.loads((stage_dir(stream, 1) / "adapter" / "adapter_config.json").read_text())
    scaling = saved["lora_alpha"] / saved["r"]  # ΔW = (alpha / r) B A (Hu et al. 2021, §4.1)
    for module, a in pairs(tensors, "lora_A.weight").items():
        b = tensors[module + "lora_B.weight"]
        name = module.removeprefix("base_model.model.") + "weight"
        assert torch.allclose(dict(folded.named_parameters())[name], reference[name] + scaling * b @ a, atol=1e-6)


# -- merge -------------------------------------------------------------------------------------

def test_task_arithmetic_merge_serves_base_plus_every_task_vector(runs):
    stream = runs("merge", {"name": "merge", "merge_method": "task_arithmetic"})
    dirs = [stage_dir(stream, i) / "adapter" for i in (1, 2)]
    base, _ = tiny()
    reference = {name: p.detach().clone() for name, p in base.named_parameters()}
    merged = add_deltas(base, merged_deltas(dirs, "task_arithmetic", 0.5, 1.0))
    saved = json.loads((dirs[0] / "adapter_config.json").read_text())
    scaling = saved["lora_alpha"] / saved["r"]
    first, second = adapter_tensors(stream, 1), adapter_tensors(stream, 2)
    for module, a in pairs(first, "lora_A.weight").items():
        name = module.removeprefix("base_model.model.") + "weight"
        expected = reference[name] + scaling * (first[module + "lora_B.weight"] @ a
                                            + second[module + "lora_B.weight"] @ pairs(second, "lora_A.weight")[module])
        assert torch.allclose(dict(merged.named_parameters())[name], expected, atol=1e-6)


# -- InfLoRA -----------------------------------------------------------------------------------

def test_designed_rows_are_orthonormal_and_avoid_the_protected_subspace():
    torch.manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(10, 3))
    inputs = torch.randn(10, 50)
    rows = designed_down_projection(inputs @ inputs.T, basis, 4)
    assert torch.allclose(rows @ rows.T, torch.eye(4, dtype=rows.dtype), atol=1e-6)
    assert (rows @ basis.double()).abs().max() < 1e-6


def test_grow_basis_captures_the_asked_energy_with_orthonormal_columns():
    torch.manual_seed(1)
    inputs = torch.randn(8, 40) * torch.tensor([5.0, 4, 3, 1, 0.5, 0.2, 0.1, 0.1]).unsqueeze(1)
    covariance = inputs @ inputs.T
    basis = grow_basis(covariance, None, 0.9)
    captured = torch.trace(basis.T @ covariance @ basis) / torch.trace(covariance)
    assert captured >= 0.9 and basis.shape[1] < 8
    assert torch.allclose(basis.T @ basis, torch.eye(basis.shape[1]), atol=1e-5)
    smaller = grow_basis(covariance, None, 0.5)
    assert smaller.shape[1] <= basis.shape[1]


def test_inflora_updates_do_not_touch_the_earlier_tasks_input_subspace(runs):
    stream = runs("inflora", {"name": "inflora", "energy": 0.9})
    sequential = runs("sequential", {"name": "sequential"})
    bases = method_state(stream, 1)["bases"]

    def interference(run):
        tensors = adapter_tensors(run, 2)
        values = []
        for module, a in pairs(tensors, "lora_A.weight").items():
            basis = bases[module.removeprefix("base_model.model.").rstrip(".")]
            delta = tensors[module + "lora_B.weight"] @ a  # (out, in)
            values.append(float((delta @ basis).norm() / delta.norm().clamp_min(1e-12)))
        return max(values)

    assert interference(stream) < 1e-4  # ΔW_2 M = 0: task 1's inputs see no change
    assert interference(sequential) > 0.1


# -- MIGU --------------------------------------------------------------------------------------

def test_top_mask_keeps_the_largest_fraction():
    assert top_mask(torch.tensor([0.1, 0.4, 0.2, 0.3]), 0.5).tolist() == [False, True, False, True]


def test_migu_moves_only_rows_of_large_outputs(runs):
    migu = runs("migu", {"name": "migu", "top_fraction": 0.25})
    sequential = runs("sequential", {"name": "sequential"})

    def untouched_rows(run):
        b = [t for k, t in adapter_tensors(run, 1).items() if k.endswith("lora_B.weight")]
        return sum(int((t.abs().sum(1) == 0).sum()) for t in b) / sum(t.shape[0] for t in b)

    assert untouched_rows(sequential) == 0
    assert untouched_rows(migu) > 0.3  # two steps of a top-25% mask leave most rows at B's zero init


# -- per-task adapters with a selector ---------------------------------------------------------

def test_the_selector_routes_each_task_to_its_own_adapter(runs):
    stream = runs("task_adapters", {"name": "task_adapters"})
    state = method_state(stream, 2)
    model, tokenizer = tiny()
    names = ["t0", "t1"]
    for name, stage in zip(names, (1, 2)):
        load_adapter(model, stage_dir(stream, stage) / "adapter", name)
    from tuneforge.adapters.model import wrapped_layers
    from tuneforge.data import get_dataset
    from tuneforge.eval.generation import PromptFormat

    prompt_format = PromptFormat.for_tokenizer("auto", tokenizer)  # prompts as the evaluation renders them
    layer = next(layer for _, layer in wrapped_layers(model))
    chosen = {}
    with routed(model, names, torch.stack(state["centroids"])):
        for task, dataset in enumerate(("unit_conversion", "string_reversal")):
            chosen[task] = []
            for example in get_dataset(dataset, split="eval", size=3):
                ids = torch.tensor([prompt_format.encode(example.prompt_messages, tokenizer)])
                seen = []
                # The selector's own embedding forward (adapters off) runs first; the routed forward comes last.
                hook = layer.register_forward_pre_hook(lambda module, args: seen.append(module.row_adapters))
                model(input_ids=ids, attention_mask=torch.ones_like(ids))
                hook.remove()
                chosen[task] += seen[-1]
    assert chosen == {0: ["t0"] * 3, 1: ["t1"] * 3}


# -- SEMA (simplified) -------------------------------------------------------------------------

def test_sema_lite_expands_only_on_a_shift(runs, tmp_path):
    config = stream_config(tmp_path, {"name": "sema_lite", "centroid_examples": 8}, **SMALL)
    config["train"]["training"]["max_steps"] = 1
    config["tasks"] = [{"data": "unit_conversion"}, {"data": "unit_conversion", "name": "more_units", "options": {"seed": 5}},
                       {"data": "string_reversal"}]
    run_continual(config, model_and_tokenizer=tiny(), say=quiet)
    stream = tmp_path / "stream"
    assert method_state(stream, 3)["expansions"].tolist() == [True, False, True]
    second = yaml.safe_load((stage_dir(stream, 2) / "config.yaml").read_text())
    assert second["training"]["init_adapter"] == str(stage_dir(stream, 1) / "adapter")  # same adapter, continued
    assert len(json.loads((stream / "report.json").read_text())["R"]) == 3


def test_lora_only_methods_refuse_other_adapters_before_the_model_loads(tmp_path):
    config = stream_config(tmp_path, {"name": "olora"})
    config["train"]["adapter"] = {"method": "ia3"}
    with pytest.raises(ConfigError, match="method.name='olora' works on LoRA's factors"):
        run_continual(config, say=quiet)
