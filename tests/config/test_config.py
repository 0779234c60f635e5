"""Config errors are reported together, in the user's key names, before any model loads."""

from __future__ import annotations

import pytest

from tuneforge.cli import main
from tuneforge.config import apply_overrides, load_config_file, parse_train_config
from tuneforge.errors import ConfigError


def test_unknown_keys_wrong_types_and_bad_values_reported_at_once():
    with pytest.raises(ConfigError) as err:
        parse_train_config({
            "trainig": {},
            "training": {"lr": "fast", "schedular": "cosine", "precision": "bf32"},
            "adapter": {"rr": 4},
        }, source="my.yaml")
    message = str(err.value)
    assert message.startswith("my.yaml has 5 problem(s)")
    assert "trainig: unknown key — did you mean 'training'?" in message
    assert "training.schedular: unknown key — did you mean 'training.scheduler'?" in message
    assert "adapter.rr: unknown key — did you mean 'adapter.r'?" in message
    assert "training.precision='bf32': allowed values are 'auto', 'fp32', 'bf16' or 'fp16'" in message
    assert "training.lr='fast'" in message


def test_unknown_adapter_method_suggests():
    with pytest.raises(ConfigError, match="unknown adapter method 'lorra'.*Did you mean 'lora'"):
        parse_train_config({"adapter": {"method": "lorra"}})


def test_dotted_overrides_parse_values():
    data = apply_overrides({"training": {"lr": 1.0}}, ["training.lr=1e-4", "adapter.r=4", "data.packing=false",
                                                       "adapter.target_modules=[q_proj,v_proj]"])
    config = parse_train_config(data)
    assert config.training.lr == 1e-4 and config.adapter.r == 4 and config.data.packing is False
    assert config.adapter.target_modules == ["q_proj", "v_proj"]
    with pytest.raises(ConfigError, match="must look like key=value"):
        apply_overrides({}, ["training.lr"])


def test_yaml_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config_file(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        load_config_file(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config_file(listing)


def test_cli_reports_config_error_without_traceback(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  batchsize: 4\n")
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "training.batchsize: unknown key — did you mean 'training.batch_size'?" in err
    assert "Traceback" not in err


def test_train_help_documents_every_key(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for key in ("training.lr", "training.grad_accum", "data.packing", "data.on_bad_record", "adapter.r", "output_dir"):
        assert key in out
