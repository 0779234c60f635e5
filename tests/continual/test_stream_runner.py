"""The continual runner: R after every stage, the report and plots, bad input refused before a model
loads, and a stream resumed after a crash mid-task equal to one that never stopped."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import quiet, stream_config, tiny
from safetensors.torch import load_file

from tuneforge.continual import run_continual
from tuneforge.errors import ConfigError, DataError


def test_sequential_stream_fills_r_and_writes_the_report(tmp_path):
    report = run_continual(stream_config(tmp_path), model_and_tokenizer=tiny(), say=quiet)
    stream = tmp_path / "stream"
    assert report["tasks"] == ["unit_conversion", "string_reversal"]
    assert len(report["R"]) == 2 and all(len(row) == 2 for row in report["R"])
    assert set(report["metrics"]) == {"average_accuracy", "backward_transfer", "forgetting", "forward_transfer"}
    assert len(report["probe"]["loss_after_stage"]) == 2 and report["probe"]["base_loss"] > 0
    assert json.loads((stream / "report.json").read_text())["R"] == report["R"]
    assert (stream / "accuracy_matrix.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in (stream / "task_curves").iterdir()) == ["01-unit_conversion.png", "02-string_reversal.png"]
    first, second = stream / "stages" / "01-unit_conversion", stream / "stages" / "02-string_reversal"
    assert (first / "adapter").is_dir() and (second / "adapter").is_dir()
    # Sequential finetuning: stage 2 starts from stage 1's adapter, so its adapter differs from a fresh one's
    # start only by task 2's steps; the recorded config says where it started.
    import yaml

    assert yaml.safe_load((second / "config.yaml").read_text())["training"]["init_adapter"] == str(first / "adapter")
    assert yaml.safe_load((first / "config.yaml").read_text())["training"]["init_adapter"] is None


def test_joint_training_is_one_stage_on_every_task_with_their_summed_budget(tmp_path):
    report = run_continual(stream_config(tmp_path, {"name": "joint"}), model_and_tokenizer=tiny(), say=quiet)
    assert report["stages"] == [[0, 1]] and len(report["R"]) == 1
    assert report["metrics"]["average_accuracy"] == pytest.approx(sum(report["R"][0]) / 2)
    stage = tmp_path / "stream" / "stages" / "01-joint"
    assert json.loads((stage / "summary.json").read_text())["steps"] == 4  # 2 steps per task, two tasks
    assert len((stage / "train.jsonl").read_text().splitlines()) == 16
    with pytest.raises(ConfigError, match="already holds a stream.*--resume"):  # refused before a model loads
        run_continual(stream_config(tmp_path, {"name": "joint"}), say=quiet)


def test_a_stream_of_one_task_is_refused_before_the_model_loads(tmp_path):
    with pytest.raises(ConfigError, match="1 task; continual learning needs at least 2"):
        run_continual(stream_config(tmp_path, tasks=("arithmetic",)), say=quiet)  # no model passed: loading would fail
    assert not (tmp_path / "stream").exists()


def test_a_task_without_gold_answers_is_refused_before_the_model_loads(tmp_path):
    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"text": "plain text has no answer"}) + "\n")
    config = stream_config(tmp_path)
    config["tasks"] = [{"data": "arithmetic"}, {"data": str(text), "eval": str(text), "name": "prose"}]
    with pytest.raises(DataError, match=r"tasks\[1\] \(prose\): 1 of 1 eval examples have no gold answer"):
        run_continual(config, say=quiet)
    assert not (tmp_path / "stream").exists()


def test_unknown_method_and_bad_options_are_named(tmp_path):
    with pytest.raises(ConfigError, match="method.name='replayy' is not a continual method"):
        run_continual(stream_config(tmp_path, {"name": "replayy"}), say=quiet)
    with pytest.raises(ConfigError, match="stream='nope' is not a bundled stream"):
        run_continual({**stream_config(tmp_path), "tasks": [], "stream": "nope"}, say=quiet)


class Crash(Exception):
    pass


def test_a_stream_resumed_after_a_crash_mid_task_matches_one_that_never_stopped(tmp_path):
    def config(where):
        cfg = stream_config(where)
        cfg["train"]["training"].update(max_steps=3, save_every=1)
        return cfg

    whole = run_continual(config(tmp_path / "a"), model_and_tokenizer=tiny(), say=quiet)
    calls = []

    def crash_in_task_two(step, loss):
        calls.append(step)
        if len(calls) == 5:  # step 2 of the second task
            raise Crash

    with pytest.raises(Crash):
        run_continual(config(tmp_path / "b"), model_and_tokenizer=tiny(), on_step=crash_in_task_two, say=quiet)
    stage_two = tmp_path / "b" / "stream" / "stages" / "02-string_reversal"
    assert (stage_two / "checkpoints").is_dir() and not (stage_two / "adapter").exists()
    resumed_steps = []
    resumed = run_continual(config(tmp_path / "b"), model_and_tokenizer=tiny(), resume=True, say=quiet,
                            on_step=lambda step, loss: resumed_steps.append(step))
    assert resumed_steps == [2, 3], "task 1 is not retrained; task 2 continues from its step-1 checkpoint"
    assert resumed["R"] == whole["R"]
    assert resumed["probe"] == whole["probe"]
    for stage in ("01-unit_conversion", "02-string_reversal"):
        a = load_file(tmp_path / "a" / "stream" / "stages" / stage / "adapter" / "adapter_model.safetensors")
        b = load_file(tmp_path / "b" / "stream" / "stages" / stage / "adapter" / "adapter_model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_cli_prints_a_bad_stream_as_a_message(tmp_path, capsys):
    import yaml

    from tuneforge.cli import main

    path = tmp_path / "one.yaml"
    path.write_text(yaml.safe_dump(stream_config(tmp_path, tasks=("arithmetic",))))
    assert main(["continual", str(path), "eval_size=3"]) != 0
    err = capsys.readouterr().err
    assert "continual learning needs at least 2 tasks" in err and "Traceback" not in err
