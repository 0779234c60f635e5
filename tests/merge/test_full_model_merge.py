"""Full-model merging: every method equals a naive in-memory formula; memory holds a few tensors at a time."""

from __future__ import annotations

import json
import math
import weakref

import pytest
import torch
from safetensors import safe_open
from tiny_models import sample_ids, tiny_llama
from transformers import AutoModelForCausalLM

from tuneforge.errors import ConfigError, ModelLoadError
from tuneforge.merge.config import parse_merge_config
from tuneforge.merge.full_model import merge_models, model_stock_ratio, slerp
from tuneforge.merge.safetensors_stream import INDEX_FILE, SafetensorsModel


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A base and three finetunes (base + a shared and an own random delta), saved with save_pretrained."""
    root = tmp_path_factory.mktemp("models")
    base = tiny_llama(seed=0)
    base.save_pretrained(root / "base")
    states = {"base": {k: v.clone() for k, v in base.state_dict().items()}}
    shared = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(9)) for k, v in states["base"].items()}
    for i, name in enumerate(["m1", "m2", "m3"]):
        generator = torch.Generator().manual_seed(10 + i)
        tuned = tiny_llama(seed=0)
        with torch.no_grad():
            for key, param in tuned.named_parameters():
                param.add_((shared[key] + torch.randn(param.shape, generator=generator)) * 0.01)
        tuned.save_pretrained(root / name)
        states[name] = {k: v.clone() for k, v in tuned.state_dict().items()}
    return root, states


def run(saved, tmp_path, raw):
    root, _ = saved
    raw = dict(raw)
    raw["models"] = [{"model": str(root / m["model"]), **({"parameters": m["parameters"]} if "parameters" in m else {})}
                     for m in raw["models"]]
    if "base_model" in raw:
        raw["base_model"] = str(root / raw["base_model"])
    out = tmp_path / "merged"
    summary = merge_models(parse_merge_config(raw), out)
    return out, summary


def naive_trim(t, density):
    k = int(density * t.numel())
    threshold = t.abs().reshape(-1).sort(descending=True).values[k - 1]
    return torch.where(t.abs() >= threshold, t, torch.zeros_like(t))


def naive_ties(deltas, weights, densities):
    trimmed = [naive_trim(d, dens) for d, dens in zip(deltas, densities)]
    elected = torch.sign(sum(trimmed))
    elected[elected == 0] = 1
    total, count = torch.zeros_like(deltas[0]), torch.zeros_like(deltas[0])
    for w, t in zip(weights, trimmed):
        agree = (torch.sign(t) == elected) & (t != 0)
        total += torch.where(agree, w * t, 0.0)
        count += agree.float()
    return total / count.clamp(min=1)


def naive_slerp(a, b, t):
    a64, b64 = a.double().reshape(-1), b.double().reshape(-1)
    omega = math.acos(float(a64 @ b64 / (a64.norm() * b64.norm())))
    return ((math.sin((1 - t) * omega) * a64 + math.sin(t * omega) * b64) / math.sin(omega)).reshape(a.shape).float()


def naive_model_stock(base, tuned):
    d1, d2 = (tuned[0] - base).reshape(-1), (tuned[1] - base).reshape(-1)
    cos = float(d1 @ d2 / (d1.norm() * d2.norm()))
    t = 2 * cos / (cos + 1)
    return t * (tuned[0] + tuned[1]) / 2 + (1 - t) * base


def expected(method, states, name):
    base = states["base"][name]
    m1, m2 = states["m1"][name], states["m2"][name]
    if method == "linear":
        return (1.0 * m1 + 3.0 * m2) / 4.0
    if method == "task_arithmetic":
        return base + 0.5 * (m1 - base) + 0.7 * (m2 - base)
    if method == "magnitude_prune":
        return base + 0.5 * naive_trim(m1 - base, 0.5) + 0.7 * naive_trim(m2 - base, 0.3)
    if method == "ties":
        return base + naive_ties([m1 - base, m2 - base], [0.5, 0.7], [0.5, 0.3])
    if method == "slerp":
        return naive_slerp(base, m1, 0.3)
    if method == "model_stock":
        return naive_model_stock(base, [m1, m2])
    raise AssertionError(method)


CONFIGS = {
    "linear": dict(merge_method="linear", models=[{"model": "m1", "parameters": {"weight": 1.0}},
                                                    {"model": "m2", "parameters": {"weight": 3.0}}]),
    "task_arithmetic": dict(merge_method="task_arithmetic", base_model="base",
                            models=[{"model": "m1", "parameters": {"weight": 0.5}}, {"model": "m2", "parameters": {"weight": 0.7}}]),
    "magnitude_prune": dict(merge_method="magnitude_prune", base_model="base", parameters={"density": 0.5},
                            models=[{"model": "m1", "parameters": {"weight": 0.5}},
                                    {"model": "m2", "parameters": {"weight": 0.7, "density": 0.3}}]),
    "ties": dict(merge_method="ties", base_model="base", parameters={"density": 0.5},
                 models=[{"model": "m1", "parameters": {"weight": 0.5}},
                         {"model": "m2", "parameters": {"weight": 0.7, "density": 0.3}}]),
    "slerp": dict(merge_method="slerp", base_model="base", parameters={"t": 0.3}, models=[{"model": "m1"}]),
    "model_stock": dict(merge_method="model_stock", base_model="base", models=[{"model": "m1"}, {"model": "m2"}]),
}


@pytest.mark.parametrize("method", list(CONFIGS))
def test_merge_equals_naive_formula_and_loads(saved, tmp_path, method):
    out, summary = run(saved, tmp_path, CONFIGS[method])
    _, states = saved
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        names = list(handle.keys())
        assert sorted(names) == sorted(states["base"])
        for name in names:
            torch.testing.assert_close(handle.get_tensor(name), expected(method, states, name), atol=2e-6, rtol=1e-5)
    model = AutoModelForCausalLM.from_pretrained(out)  # config and weights form a loadable model
    assert torch.isfinite(model(sample_ids()).logits).all()
    assert summary["tensors"] == len(states["base"]) and "config.json" in summary["copied"]


def test_dare_is_seeded_and_unbiased_where_density_is_one(saved, tmp_path):
    raw = dict(merge_method="dare_linear", base_model="base", parameters={"density": 0.5, "seed": 3},
               models=[{"model": "m1"}, {"model": "m2", "parameters": {"density": 1.0}}])
    first, _ = run(saved, tmp_path / "a", raw)
    second, _ = run(saved, tmp_path / "b", raw)
    _, states = saved
    name = "model.layers.0.mlp.down_proj.weight"
    with safe_open(str(first / "model.safetensors"), framework="pt") as a, \
            safe_open(str(second / "model.safetensors"), framework="pt") as b:
        merged = a.get_tensor(name)
        torch.testing.assert_close(merged, b.get_tensor(name), atol=0, rtol=0)  # same seed, same masks
    base, d1, d2 = states["base"][name], states["m1"][name] - states["base"][name], states["m2"][name] - states["base"][name]
    kept_from_m1 = merged - base - d2  # density 1 keeps m2's delta whole; m1's survivors are doubled
    survivors = kept_from_m1.abs() > 1e-7
    assert 0.35 < survivors.float().mean() < 0.65
    torch.testing.assert_close(kept_from_m1[survivors], 2 * d1[survivors], atol=1e-5, rtol=1e-4)


def test_slerp_falls_back_to_lerp_for_colinear_vectors():
    v = torch.randn(10)
    torch.testing.assert_close(slerp(v, 2 * v, 0.25), 1.25 * v)
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    torch.testing.assert_close(slerp(a, b, 0.5), torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]))


def test_model_stock_ratio_follows_the_paper():
    base_delta = torch.tensor([1.0, 0.0])
    assert model_stock_ratio([base_delta, base_delta]) == pytest.approx(1.0)  # identical deltas: the average
    assert model_stock_ratio([base_delta, torch.tensor([0.0, 1.0])]) == pytest.approx(0.0)  # orthogonal: the base
    cos = 0.5
    d2 = torch.tensor([cos, math.sqrt(1 - cos**2)])
    assert model_stock_ratio([base_delta, d2]) == pytest.approx(2 * cos / (cos + 1))


class CountingModel(SafetensorsModel):
    """Tracks how many tensors handed out by all readers are alive, and their peak bytes."""

    live: set[int] = set()
    live_bytes = 0
    peak_tensors = 0
    peak_bytes = 0
    next_id = 0

    def get(self, name):
        tensor = super().get(name)
        cls = CountingModel
        cls.next_id += 1
        ident, size = cls.next_id, tensor.numel() * tensor.element_size()
        cls.live.add(ident)
        cls.live_bytes += size
        cls.peak_tensors = max(cls.peak_tensors, len(cls.live))
        cls.peak_bytes = max(cls.peak_bytes, cls.live_bytes)
        weakref.finalize(tensor, CountingModel._release, ident, size)
        return tensor

    @staticmethod
    def _release(ident, size):
        CountingModel.live.discard(ident)
        CountingModel.live_bytes -= size


def test_memory_stays_near_one_tensor_per_model_and_output_is_sharded(tmp_path):
    big = tiny_llama(seed=0, num_hidden_layers=6, hidden_size=64, intermediate_size=128)
    for name, seed in (("base", 0), ("a", 1), ("b", 2)):
        torch.manual_seed(seed)
        with torch.no_grad():
            for param in big.parameters():
                param.add_(torch.randn_like(param) * 0.01)
        big.save_pretrained(tmp_path / name, max_shard_size="100KB")  # sharded inputs, with an index
    assert (tmp_path / "a" / INDEX_FILE).is_file()
    largest = max(p.numel() * 4 for p in big.parameters())
    total = sum(p.numel() * 4 for p in big.parameters())
    budget = 5 * largest  # 3 inputs + 2 spare
    assert total > 3 * budget  # one model alone exceeds the budget
    raw = dict(merge_method="ties", base_model=str(tmp_path / "base"), parameters={"density": 0.5},
               models=[{"model": str(tmp_path / "a")}, {"model": str(tmp_path / "b")}], max_shard_size="150KB")
    CountingModel.live, CountingModel.live_bytes, CountingModel.peak_tensors, CountingModel.peak_bytes = set(), 0, 0, 0
    merge_models(parse_merge_config(raw), tmp_path / "out", open_model=CountingModel)
    assert CountingModel.peak_tensors <= 3 + 2
    assert CountingModel.peak_bytes <= budget
    index = json.loads((tmp_path / "out" / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.isfinite(merged(sample_ids()).logits).all()


def test_dtype_is_converted_and_recorded(saved, tmp_path):
    raw = dict(CONFIGS["task_arithmetic"], dtype="bfloat16")
    out, _ = run(saved, tmp_path, raw)
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        assert all(handle.get_tensor(k).dtype == torch.bfloat16 for k in handle.keys())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize("raw,match", [
    (dict(merge_method="ties", base_model="base", models=[{"model": "m1"}]), r"needs a density"),
    (dict(merge_method="ties", base_model="base", parameters={"density": 1.5}, models=[{"model": "m1"}]),
     r"parameters.density=1.5: .*less than or equal to 1"),
    (dict(merge_method="ties", base_model="base", parameters={"density": 0}, models=[{"model": "m1"}]),
     r"parameters.density=0: .*greater than 0"),
    (dict(merge_method="task_arithmetic", models=[{"model": "m1"}]), r"set base_model"),
    (dict(merge_method="slerp", models=[{"model": "m1"}, {"model": "m2"}, {"model": "m3"}], parameters={"t": 0.5}),
     r"exactly two models"),
    (dict(merge_method="slerp", base_model="base", models=[{"model": "m1"}]), r"needs parameters.t"),
    (dict(merge_method="model_stock", base_model="base", models=[{"model": "m1"}]), r"at least two"),
    (dict(merge_method="linear", models=[{"model": "m1", "parameters": {"density": 0.5}}]), r"has no effect"),
    (dict(merge_method="ties", base_model="base", parameters={"densty": 0.5}, models=[{"model": "m1"}]),
     r"parameters.densty: unknown key — did you mean 'parameters.density'\?"),
    (dict(merge_method="ties", base_model="base", models=[{"model": "m1", "parameters": {"wieght": 1}}]),
     r"models\[0\].parameters.wieght: unknown key — did you mean 'models\[0\].parameters.weight'\?"),
    (dict(merge_method="tie", base_model="base", models=[{"model": "m1"}]), r"merge_method='tie'"),
    (dict(merge_method="linear", models=[{"model": "m1"}], max_shard_size="lots"), r"not a size"),
    (dict(merge_method="linear", models=[{"model": "m1", "parameters": {"weight": 1}},
                                         {"model": "m2", "parameters": {"weight": -1}}]), r"sum of the weights, which is 0"),
])
def test_bad_config_is_a_config_error_naming_the_key(raw, match):
    with pytest.raises(ConfigError, match=match):
        parse_merge_config(raw)


def test_missing_model_files_are_reported(saved, tmp_path):
    root, _ = saved
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((root / "base" / "config.json").read_text())
    raw = dict(merge_method="linear", models=[{"model": str(root / "m1")}, {"model": str(empty)}])
    with pytest.raises(ModelLoadError, match=r"neither model.safetensors nor model.safetensors.index.json"):
        merge_models(parse_merge_config(raw), tmp_path / "out")
    raw = dict(merge_method="task_arithmetic", base_model=str(tmp_path / "nowhere"), models=[{"model": str(root / "m1")}])
    with pytest.raises(ModelLoadError, match="nowhere"):
        merge_models(parse_merge_config(raw), tmp_path / "out2")


def test_models_of_different_sizes_are_refused(saved, tmp_path):
    root, _ = saved
    tiny_llama(hidden_size=48).save_pretrained(tmp_path / "wide")
    raw = dict(merge_method="linear", models=[{"model": str(root / "m1")}, {"model": str(tmp_path / "wide")}])
    with pytest.raises(ModelLoadError, match=r"differ in size"):
        merge_models(parse_merge_config(raw), tmp_path / "out")
