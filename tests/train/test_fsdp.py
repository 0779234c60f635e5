"""FSDP2 (fully_shard over gloo, 2 CPU processes) against one process.

Oracle: the run's definition, as for DDP (test_distributed.py). ``training.batch_size`` is the
global micro-batch, so full finetuning sharded over 2 ranks (each b rows, each holding half of every
weight, gradient and AdamW moment) must take the steps of one process with batch 2b: the same loss,
the same gradient norm (FSDP's default reduce-scatter averages; an average would halve it) and the
same final weights in ``model/``.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import (  # noqa: F401 - model_dir and other_model_dir are fixtures
    assert_same_steps,
    launch,
    model_dir,
    other_model_dir,
    settings,
    train_records,
    write_config,
)

from tuneforge.config import parse_train_config
from tuneforge.errors import ConfigError
from tuneforge.train import train
from tuneforge.train.checkpoint import CheckpointError
from tuneforge.train.strategy import check_distributed, chosen_strategy


def full_settings(model_dir, output_dir, **training):
    values = settings(model_dir, output_dir, **{"lr": 1e-3, **training})
    values["adapter"] = {"method": "full"}
    values["distributed"] = {"strategy": "fsdp"}
    return values


def model_tensors(run_dir):
    return load_file(run_dir / "model" / "model.safetensors")


def assert_same_weights(mine, theirs):
    assert mine.keys() == theirs.keys()
    for name in mine:
        torch.testing.assert_close(mine[name], theirs[name], rtol=1e-4, atol=1e-5, msg=name)


def test_fsdp_full_finetuning_on_two_ranks_takes_the_steps_of_one_process_and_resumes_across_world_sizes(
        tmp_path, model_dir, other_model_dir, one_torch_thread):
    one_settings = full_settings(model_dir, tmp_path / "one", max_steps=4, save_every=2)
    reference = train(parse_train_config(one_settings))
    expected, expected_weights = train_records(reference.run_dir), model_tensors(reference.run_dir)
    base = load_file(model_dir / "model.safetensors")
    assert any(not torch.equal(expected_weights[k], base[k]) for k in base), "the weights must have trained"

    # 2 ranks x 2 rows per micro-batch, each rank holding half of every weight == 1 process x 4 rows.
    two_settings = full_settings(model_dir, tmp_path / "two", max_steps=4, save_every=2)
    config = write_config(tmp_path, two_settings)
    result = launch(["-m", "tuneforge", "train", str(config), "--nproc", "2"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "read only its rows of the weights" in result.stderr  # no rank loaded the whole model (sharded_load.py)
    assert_same_steps(train_records(tmp_path / "two"), expected)
    assert_same_weights(model_tensors(tmp_path / "two"), expected_weights)
    checkpoint = tmp_path / "two" / "checkpoints" / "step-0000002"
    shard_files = sorted(p.name for p in (checkpoint / "sharded").iterdir())
    assert shard_files == [".metadata", "__0_0.distcp", "__1_0.distcp"], "each rank writes its own shards (DCP)"
    assert not (checkpoint / "weights").exists()

    # 2 -> 1: the sharded step-2 checkpoint resumed in one process takes the same steps 3 and 4.
    resumed = []
    train(parse_train_config(two_settings), resume=True, on_step=lambda step, loss: resumed.append(loss))
    assert resumed == pytest.approx([r["train_loss"] for r in expected[2:]], rel=1e-5)
    assert_same_weights(model_tensors(tmp_path / "two"), expected_weights)

    # The sharded checkpoint meets another model (--resume-anyway skips the config comparison): a clear error.
    other = full_settings(other_model_dir, tmp_path / "two", max_steps=4, save_every=2)
    with pytest.raises(CheckpointError, match="does not fit this run's trainable weights"):
        train(parse_train_config(other), resume_anyway=True)
    result = launch(["-m", "tuneforge", "train", str(write_config(tmp_path, other, name="other.yaml")), "--nproc", "2",
                     "--resume-anyway"], tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.count("Size mismatch") == 2, result.stderr[-3000:]  # one clear error per rank, no hang
    assert "Traceback" not in result.stderr

    # 1 -> 2: the one-process step-2 checkpoint (whole tensors) resumed on two FSDP ranks.
    config = write_config(tmp_path, one_settings, name="one.yaml")
    result = launch(["-m", "tuneforge", "train", str(config), "--nproc", "2", "--resume"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_steps(train_records(tmp_path / "one"), expected)
    assert_same_weights(model_tensors(tmp_path / "one"), expected_weights)


@pytest.mark.parametrize("values, strategy", [
    ({"adapter": {"method": "full"}}, "fsdp"),
    ({"adapter": {"method": "lora"}}, "ddp"),
    ({"adapter": {"method": "full"}, "distributed": {"strategy": "ddp"}}, "ddp"),
])
def test_auto_picks_fsdp_for_full_finetuning_and_ddp_for_adapters(values, strategy):
    assert chosen_strategy(parse_train_config(values)) == strategy


@pytest.mark.parametrize("values, message", [
    ({"quantization": {"bits": 4}}, "QLoRA .* does not run under FSDP"),
    ({"training": {"batch_size": 4, "optimizer": "adamw8bit"}}, "optimizer='adamw8bit' .* not tested"),
    ({"training": {"batch_size": 4, "compile": True}}, "training.compile is not tested under FSDP"),
])
def test_what_fsdp_cannot_shard_is_refused_before_anything_loads(values, message):
    config = parse_train_config({"training": {"batch_size": 4}, "distributed": {"strategy": "fsdp"}, **values})
    with pytest.raises(ConfigError, match=message):
        check_distributed(config, 2)
    check_distributed(parse_train_config({**values, "training": {"batch_size": 4, **values.get("training", {})},
                                          "distributed": {"strategy": "ddp"}}), 2)  # DDP takes them


def test_fsdp_lora_on_two_ranks_takes_the_steps_of_one_process(tmp_path, model_dir, one_torch_thread):
    """Frozen base weights and trainable float32 LoRA factors share each layer's FSDP unit."""
    from test_distributed import adapter_tensors, assert_same_adapter

    values = settings(model_dir, tmp_path / "one")
    reference = train(parse_train_config(values))
    # ZeRO-2-like here (the full-finetuning test runs the default, ZeRO-3-like): the same steps either way.
    config = write_config(tmp_path, {**settings(model_dir, tmp_path / "two"),
                                     "distributed": {"strategy": "fsdp", "fsdp": {"reshard_after_forward": False}}})
    result = launch(["-m", "tuneforge", "train", str(config), "--nproc", "2"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_steps(train_records(tmp_path / "two"), train_records(reference.run_dir))
    assert_same_adapter(adapter_tensors(tmp_path / "two"), adapter_tensors(reference.run_dir))


def test_a_bf16_base_with_a_float32_adapter_gets_a_mixed_precision_policy():
    from torch import nn

    from tuneforge.train.strategy import mixed_precision_policy

    layer = nn.Linear(4, 4).to(torch.bfloat16)
    layer.register_parameter("adapter", nn.Parameter(torch.zeros(4)))  # float32, as tuneforge's LoRA factors
    policy = mixed_precision_policy(layer)
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert mixed_precision_policy(nn.Linear(4, 4)).param_dtype is None  # one dtype: no casting


def test_hsdp_with_cpu_offload_on_four_ranks_takes_the_steps_of_one_process(tmp_path, model_dir, one_torch_thread):
    """2 replica groups x 2 shards (a 2-D mesh: reduce-scatter inside a group, all-reduce across groups),
    every shard in CPU memory: still the steps and final weights of one process with the whole batch."""
    reference = train(parse_train_config(full_settings(model_dir, tmp_path / "one", max_steps=4)))
    expected = train_records(reference.run_dir)
    values = full_settings(model_dir, tmp_path / "hsdp", max_steps=4, save_every=2)
    values["distributed"]["fsdp"] = {"replicas": 2, "cpu_offload": True}
    result = launch(["-m", "tuneforge", "train", str(write_config(tmp_path, values)), "--nproc", "4"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "HSDP: 2 replica groups x 2 shards; shards offloaded to CPU memory" in result.stderr
    assert "read only its rows of the weights" in result.stderr  # rows along the mesh's shard dimension
    assert_same_steps(train_records(tmp_path / "hsdp"), expected)
    assert_same_weights(model_tensors(tmp_path / "hsdp"), model_tensors(reference.run_dir))
    # The step-2 checkpoint (DCP over the 2-D mesh) resumes in one process with steps 3 and 4.
    resumed = []
    train(parse_train_config(values), resume=True, on_step=lambda step, loss: resumed.append(loss))
    assert resumed == pytest.approx([r["train_loss"] for r in expected[2:]], rel=1e-5)


def test_replicas_that_do_not_divide_the_processes_are_refused_before_anything_loads():
    def config(batch_size):
        return parse_train_config({"training": {"batch_size": batch_size}, "adapter": {"method": "full"},
                                   "distributed": {"fsdp": {"replicas": 2}}})

    with pytest.raises(ConfigError, match="replicas=2 must divide the 3 processes"):
        check_distributed(config(6), 3)
    check_distributed(config(4), 4)  # 2 groups of 2
