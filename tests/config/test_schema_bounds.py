"""Schema bounds: values that would break a run are config errors, reported before any model loads."""

from __future__ import annotations

import pytest

from tuneforge.cli import main
from tuneforge.config import apply_overrides, parse_train_config
from tuneforge.errors import ConfigError


@pytest.mark.parametrize("override", ["training.lr=inf", "training.lr=.inf", "training.lr=nan", "training.lr=1e999",
                                      "training.epochs=inf", "training.epochs=.nan", "training.max_grad_norm=inf",
                                      "training.weight_decay=nan", "training.loraplus_ratio=inf"])
def test_learning_rate_epochs_and_other_floats_must_be_finite(override):
    key = override.partition("=")[0]
    with pytest.raises(ConfigError, match=rf"{key}=.*finite number"):
        parse_train_config(apply_overrides({}, [override]))


@pytest.mark.parametrize("section, message", [
    ({"bits": 4, "type": "int8"}, "bits=4 with type='int8' disagree"),
    ({"bits": 8, "type": "nf4"}, "bits=8 with type='nf4' disagree"),
    ({"bits": 8, "type": "fp4"}, "bits=8 with type='fp4' disagree"),
])
def test_quantization_bits_and_type_must_agree(section, message):
    with pytest.raises(ConfigError, match=rf"quantization: {message}"):
        parse_train_config({"quantization": section})


@pytest.mark.parametrize("section, bits, kind", [
    ({"bits": 8}, 8, "int8"), ({"type": "int8"}, 8, "int8"), ({"bits": 4}, 4, "nf4"), ({"type": "fp4"}, 4, "fp4"), ({}, 4, "nf4"),
])
def test_one_of_bits_and_type_implies_the_other(section, bits, kind):
    quantization = parse_train_config({"quantization": section}).quantization
    assert (quantization.bits, quantization.type) == (bits, kind)


@pytest.mark.parametrize("blocksize", [0, 48, 100, 8192])
def test_blocksize_is_checked_by_the_schema(blocksize):
    with pytest.raises(ConfigError, match=rf"quantization: blocksize={blocksize} is not supported; choose one of 32, 64"):
        parse_train_config({"quantization": {"bits": 4, "blocksize": blocksize}})


def test_a_bad_blocksize_fails_before_the_model_loads(tmp_path, monkeypatch, capsys):
    import tuneforge.models

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the config was checked")

    monkeypatch.setattr(tuneforge.models, "load_model", must_not_load)
    assert main(["train", f"output_dir={tmp_path / 'run'}", "quantization.blocksize=100"]) == 2
    assert "blocksize=100 is not supported" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_new_training_keys_have_bounds_and_are_documented(capsys):
    for override in ("training.max_nonfinite_steps=0", "training.eval_generate=-1"):
        with pytest.raises(ConfigError, match=override.partition("=")[0]):
            parse_train_config(apply_overrides({}, [override]))
    assert parse_train_config({}).training.max_nonfinite_steps == 5
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for key in ("training.max_nonfinite_steps", "training.eval_generate", "--resume-anyway"):
        assert key in out
