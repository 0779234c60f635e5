"""`tuneforge merge CONFIG OUTPUT`: whole-model and adapter configs through the real CLI, bad input, no partial output."""

from __future__ import annotations

import re

import pytest
import torch
import yaml
from safetensors import safe_open
from tiny_models import perturb_trainable, sample_ids, tiny_llama
from transformers import AutoModelForCausalLM

import tuneforge.merge.full_model as full_model
from tuneforge.adapters import LoraConfig, add_adapter, load_adapter, save_adapter
from tuneforge.cli import main
from tuneforge.merge import combine_adapters, read_lora

QV = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    base = tiny_llama(seed=0)
    base.save_pretrained(root / "base")
    for name, seed in (("m1", 1), ("m2", 2)):
        tuned = tiny_llama(seed=0)
        torch.manual_seed(seed)
        with torch.no_grad():
            for param in tuned.parameters():
                param.add_(torch.randn_like(param) * 0.01)
        tuned.save_pretrained(root / name)
    for name, seed, rank in (("a", 3, 4), ("b", 4, 4), ("rank2", 5, 2)):
        model = tiny_llama(seed=0)
        add_adapter(model, LoraConfig(r=rank, target_modules=QV))
        perturb_trainable(model, seed=seed)
        save_adapter(model, root / name)
    tiny_llama(seed=0, hidden_size=48).save_pretrained(root / "wide")
    return root


def flat(text: str) -> str:
    """The CLI's message with rich's line wrapping undone."""
    return " ".join(text.split())


def write_config(path, data):
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_full_model_config_through_the_cli(files, tmp_path, capsys):
    config = write_config(tmp_path / "m.yaml", {
        "merge_method": "task_arithmetic", "base_model": str(files / "base"),
        "models": [{"model": str(files / "m1"), "parameters": {"weight": 0.5}}, {"model": str(files / "m2")}]})
    assert main(["merge", config, str(tmp_path / "out")]) == 0
    assert "merged 2 models with 'task_arithmetic'" in flat(capsys.readouterr().out)
    models = {n: AutoModelForCausalLM.from_pretrained(files / n) for n in ("base", "m1", "m2")}
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    for key, value in merged.state_dict().items():
        base = models["base"].state_dict()[key]
        want = base + 0.5 * (models["m1"].state_dict()[key] - base) + (models["m2"].state_dict()[key] - base)
        torch.testing.assert_close(value, want, atol=1e-6, rtol=1e-5)


def test_adapter_config_gives_a_peft_adapter_equal_to_the_library_call(files, tmp_path):
    config = write_config(tmp_path / "a.yaml", {
        "method": "ties", "density": 0.5,
        "adapters": [{"path": str(files / "a"), "weight": 1.0}, {"path": str(files / "b"), "weight": 0.5}]})
    assert main(["merge", config, str(tmp_path / "out")]) == 0
    combine_adapters([files / "a", files / "b"], [1.0, 0.5], "ties", tmp_path / "direct", density=0.5)
    via_cli, direct = read_lora(tmp_path / "out"), read_lora(tmp_path / "direct")
    assert via_cli.modules.keys() == direct.modules.keys()
    for name, module in via_cli.modules.items():
        torch.testing.assert_close(module.delta(), direct.modules[name].delta())
    model = tiny_llama(seed=0)
    load_adapter(model, tmp_path / "out")
    assert torch.isfinite(model(sample_ids()).logits).all()


def test_existing_output_is_refused_unless_overwrite(files, tmp_path, capsys):
    config = write_config(tmp_path / "m.yaml", {"merge_method": "linear",
                                                 "models": [{"model": str(files / "m1")}, {"model": str(files / "m2")}]})
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["merge", config, str(out)]) == 2
    assert "already exists; pick a new path or pass --overwrite" in flat(capsys.readouterr().err)
    assert (out / "keep.txt").read_text() == "mine"
    assert main(["merge", config, str(out), "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_failure_midway_leaves_no_partial_output(files, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = full_model.tensor_merge_for

    def failing_after_three(config):
        merge = real(config)

        def merge_or_fail(name, base, tensors):
            calls["n"] += 1
            if calls["n"] > 3:
                raise RuntimeError("disk full")
            return merge(name, base, tensors)
        return merge_or_fail

    monkeypatch.setattr(full_model, "tensor_merge_for", failing_after_three)
    config = write_config(tmp_path / "m.yaml", {"merge_method": "linear",
                                                 "models": [{"model": str(files / "m1")}, {"model": str(files / "m2")}]})
    with pytest.raises(RuntimeError, match="disk full"):
        main(["merge", config, str(tmp_path / "out")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.yaml"]  # no output, no staging dir left


@pytest.mark.parametrize("data,message", [
    ({"method": "ties", "density": 1.5, "adapters": [{"path": "a"}, {"path": "b"}]}, r"density=1.5: .*less than or equal to 1"),
    ({"method": "ties", "density": 0.0, "adapters": [{"path": "a"}, {"path": "b"}]}, r"density=0.0: .*greater than 0"),
    ({"method": "linear", "weights": [1.0], "adapters": [{"path": "a"}, {"path": "b"}]},
     r"weights has 1 entries for 2 adapters"),
    ({"method": "tie", "adapters": [{"path": "a"}]}, r"method='tie': unknown method.*did you mean 'ties'\?"),
    ({"method": "linear", "adapter": [{"path": "a"}]}, r"no 'models' list .* or 'adapters' list"),
    ({"method": "linear", "adapters": [{"pth": "a"}]}, r"adapters\[0\].pth: unknown key — did you mean 'adapters\[0\].path'\?"),
    ({"merge_method": "ties", "base_model": "x", "models": [{"model": "y"}]}, r"needs a density"),
])
def test_bad_configs_are_reported_by_key(tmp_path, capsys, data, message):
    config = write_config(tmp_path / "bad.yaml", data)
    assert main(["merge", config, str(tmp_path / "out")]) == 2
    err = flat(capsys.readouterr().err)
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("adapters,method,extra,message", [
    (["a", "rank2"], "linear", {}, r"ranks must be equal"),
    (["a", "wide_adapter"], "cat", {}, r"different weight shapes"),
])
def test_incompatible_adapters_are_refused(files, tmp_path, capsys, adapters, method, extra, message):
    if "wide_adapter" in adapters and not (files / "wide_adapter").exists():
        model = tiny_llama(seed=0, hidden_size=48)
        add_adapter(model, LoraConfig(r=4, target_modules=QV))
        save_adapter(model, files / "wide_adapter")
    config = write_config(tmp_path / "c.yaml", {"method": method, **extra,
                                                 "adapters": [{"path": str(files / a)} for a in adapters]})
    assert main(["merge", config, str(tmp_path / "out")]) == 2
    assert re.search(message, flat(capsys.readouterr().err))
    assert not (tmp_path / "out").exists()


def test_models_for_different_bases_are_refused(files, tmp_path, capsys):
    config = write_config(tmp_path / "m.yaml", {"merge_method": "linear",
                                                 "models": [{"model": str(files / "m1")}, {"model": str(files / "wide")}]})
    assert main(["merge", config, str(tmp_path / "out")]) == 2
    assert "differ in size" in flat(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.yaml"]


def test_missing_base_model_files_are_reported(files, tmp_path, capsys):
    config = write_config(tmp_path / "m.yaml", {"merge_method": "task_arithmetic", "base_model": str(tmp_path / "gone"),
                                                 "models": [{"model": str(files / "m1")}]})
    assert main(["merge", config, str(tmp_path / "out")]) == 2
    assert "gone" in capsys.readouterr().err


def test_merged_weights_are_written_in_the_planned_order(files, tmp_path):
    config = write_config(tmp_path / "m.yaml", {"merge_method": "linear", "dtype": "float16",
                                                 "models": [{"model": str(files / "m1")}, {"model": str(files / "m2")}]})
    assert main(["merge", config, str(tmp_path / "out")]) == 0
    with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="pt") as handle:
        assert {handle.get_tensor(k).dtype for k in handle.keys()} == {torch.float16}
