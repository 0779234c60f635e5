"""Bad input to combine_adapters: a clear error, and nothing written."""

from __future__ import annotations

import pytest
from tiny_models import perturb_trainable, tiny_gpt2, tiny_llama

import tuneforge.merge.loras as loras
from tuneforge.adapters import LoraConfig, add_adapter, save_adapter
from tuneforge.errors import AdapterError, ConfigError
from tuneforge.merge import combine_adapters, read_lora

QV = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    cases = {
        "a": (tiny_llama(), dict(r=4, target_modules=QV)),
        "b": (tiny_llama(), dict(r=4, alpha=4, target_modules=QV)),
        "rank2": (tiny_llama(), dict(r=2, target_modules=QV)),
        "other-targets": (tiny_llama(), dict(r=4, target_modules=["q_proj", "o_proj"])),
        "wider-base": (tiny_llama(hidden_size=48), dict(r=4, target_modules=QV)),
        "gpt2": (tiny_gpt2(), dict(r=4, target_modules=["c_attn"], fan_in_fan_out=True)),
        "dora": (tiny_llama(), dict(r=4, use_dora=True, target_modules=QV)),
        "saves-head": (tiny_llama(), dict(r=4, target_modules=QV, modules_to_save=["lm_head"])),
    }
    for name, (model, settings) in cases.items():
        add_adapter(model, LoraConfig(**settings))
        perturb_trainable(model)
        save_adapter(model, root / name)
    return root


def combine(saved, names, weights, method, out, **options):
    return combine_adapters([saved / n for n in names], weights, method, out, **options)


@pytest.mark.parametrize("method,hint", [("tie", "ties"), ("dare-ties", "dare_ties"), ("magnitude", "magnitude_prune")])
def test_unknown_method_suggests_the_closest(saved, tmp_path, method, hint):
    with pytest.raises(ConfigError, match=rf"unknown merge method '{method}'.*Did you mean '{hint}'\?"):
        combine(saved, "ab", [1, 1], method, tmp_path / "out")


@pytest.mark.parametrize("weights,options,match", [
    ([1.0], {}, r"got 1 weights for 2 adapters"),
    ([1.0, 1.0, 1.0], {}, r"got 3 weights for 2 adapters"),
    ([1.0, float("nan")], {}, r"finite numbers"),
    ([1.0, 1.0], dict(density=0.0), r"density=0.0 is outside \(0, 1\]"),
    ([1.0, 1.0], dict(density=1.2), r"density=1.2 is outside \(0, 1\]"),
    ([1.0, 1.0], {}, r"ties needs density="),
    ([1.0, 1.0], dict(density=0.5, majority_sign_method="mean"), r"majority_sign_method='mean'"),
    ([1.0, 1.0], dict(density=0.5, target_rank=2), r"target_rank=2 applies only to the SVD methods"),
])
def test_bad_options_are_config_errors(saved, tmp_path, weights, options, match):
    with pytest.raises(ConfigError, match=match):
        combine(saved, "ab", weights, "ties", tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


def test_all_option_problems_are_reported_at_once(saved, tmp_path):
    with pytest.raises(ConfigError) as err:
        combine(saved, "ab", [1.0], "linear", tmp_path / "out", density=0.5)
    message = str(err.value)
    assert "got 1 weights for 2 adapters" in message and "density=0.5 has no effect with method 'linear'" in message


@pytest.mark.parametrize("names,method,error,match", [
    (["a", "wider-base"], "cat", AdapterError, r"different weight shapes .* different base models"),
    (["a", "gpt2"], "svd", AdapterError, r"disagree on fan_in_fan_out"),
    (["a", "rank2"], "linear", AdapterError, r"ranks must be equal; module '.*' has ranks \[4, 2\].*Use 'cat'"),
    (["a", "other-targets"], "ties", AdapterError, r"same target modules; .* has no model.layers.0.self_attn"),
    (["a", "dora"], "cat", AdapterError, r"DoRA adapters cannot be combined"),
    (["a", "saves-head"], "cat", AdapterError, r"modules_to_save=\['lm_head'\]"),
    (["a", "missing"], "cat", AdapterError, r"does not exist"),
])
def test_incompatible_adapters_are_refused(saved, tmp_path, names, method, error, match):
    options = dict(density=0.5) if method == "ties" else {}
    with pytest.raises(error, match=match):
        combine(saved, names, [1.0, 1.0], method, tmp_path / "out", **options)
    assert list(tmp_path.iterdir()) == []


def test_ranks_may_differ_for_cat_and_svd(saved, tmp_path):
    out = combine(saved, ["a", "rank2"], [1.0, 1.0], "svd", tmp_path / "svd", target_rank=3)
    assert read_lora(out).ranks() == {3}


def test_module_filter_that_keeps_nothing(saved, tmp_path):
    with pytest.raises(ConfigError, match=r"module_filter=\['k_proj'\] kept none"):
        combine(saved, "ab", [1.0, 1.0], "cat", tmp_path / "out", module_filter=["k_proj"])


def test_existing_output_dir_is_refused_without_overwrite(saved, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(ConfigError, match=r"already exists; pick a new path or pass overwrite=True"):
        combine(saved, "ab", [1.0, 1.0], "cat", tmp_path / "out")


def test_failed_write_leaves_nothing_and_keeps_the_old_adapter(saved, tmp_path, monkeypatch):
    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(loras, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        combine(saved, "ab", [1.0, 1.0], "cat", tmp_path / "new")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    out = combine(saved, "a", [1.0], "cat", tmp_path / "kept")
    monkeypatch.setattr(loras, "save_file", broken_save)
    with pytest.raises(OSError):
        combine(saved, "ab", [1.0, 1.0], "cat", out, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["kept"]
    assert read_lora(out).ranks() == {4}  # the previous adapter, untouched
