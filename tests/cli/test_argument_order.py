"""Options and key=value overrides may come in any order on every command that takes overrides."""

from __future__ import annotations

import pytest

import tuneforge.train
import tuneforge.train.report
from tuneforge.cli import build_parser, main


@pytest.fixture
def train_calls(monkeypatch):
    """`tuneforge train` with the training itself replaced by a recorder."""
    calls = []
    monkeypatch.setattr(tuneforge.train, "train", lambda config, **flags: calls.append((config, flags)) or "summary")
    monkeypatch.setattr(tuneforge.train.report, "print_summary", lambda summary: None)
    return calls


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("training:\n  lr: 0.5\n  max_steps: 3\n")
    return path


@pytest.mark.parametrize("order", [
    ["{cfg}", "--overwrite", "training.lr=1e-4", "adapter.r=4"],  # the order the issue reports failing
    ["{cfg}", "training.lr=1e-4", "--overwrite", "adapter.r=4"],
    ["--overwrite", "{cfg}", "training.lr=1e-4", "adapter.r=4"],
    ["training.lr=1e-4", "--overwrite", "{cfg}", "adapter.r=4"],
    ["training.lr=1e-4", "adapter.r=4", "{cfg}", "--overwrite"],
])
def test_train_accepts_options_and_overrides_in_any_order(order, config_file, train_calls):
    argv = ["train", *(item.format(cfg=config_file) for item in order)]
    assert main(argv) == 0
    [(config, flags)] = train_calls
    assert config.training.lr == 1e-4 and config.adapter.r == 4
    assert config.training.max_steps == 3  # the file was read
    assert flags["overwrite"] is True and flags["resume"] is False


def test_later_overrides_win_whatever_comes_between(config_file, train_calls):
    assert main(["train", str(config_file), "training.lr=1e-3", "--resume", "training.lr=2e-3"]) == 0
    [(config, flags)] = train_calls
    assert config.training.lr == 2e-3 and flags["resume"] is True


def test_resume_anyway_reaches_train(config_file, train_calls):
    assert main(["train", str(config_file), "--resume-anyway"]) == 0
    assert train_calls[0][1]["resume_anyway"] is True


def test_unknown_options_and_two_config_files_are_still_errors(config_file, train_calls, capsys):
    with pytest.raises(SystemExit):
        main(["train", str(config_file), "--overwite", "training.lr=1e-4"])
    assert "unrecognized arguments: --overwite" in capsys.readouterr().err
    assert main(["train", str(config_file), "--overwrite", str(config_file)]) == 2
    assert "takes one config file" in capsys.readouterr().err
    assert not train_calls


def test_demo_overrides_may_follow_options():
    from tuneforge.cli import parse_arguments

    args = parse_arguments(build_parser(), ["demo", "training.max_steps=2", "--output-dir", "x", "training.lr=1e-3"])
    assert args.overrides == ["training.max_steps=2", "training.lr=1e-3"] and args.output_dir == "x"


def test_commands_without_overrides_still_refuse_stray_words(capsys):
    with pytest.raises(SystemExit):
        main(["methods", "training.lr=1e-4"])
    assert "unrecognized arguments: training.lr=1e-4" in capsys.readouterr().err
