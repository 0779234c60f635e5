"""Training on several processes (DDP over gloo, 2 CPU processes) against one process.

Oracle: the run's definition. ``training.batch_size`` is the global micro-batch, so a 2-process run
(each rank b rows) must take the same steps as one process with batch 2b: the same loss, the same
gradient norm (DDP's default average instead of a sum would halve it) and the same final adapter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny_models import tiny_chat_model_and_tokenizer

from tuneforge.cli import main
from tuneforge.config import parse_train_config
from tuneforge.errors import ConfigError
from tuneforge.train import train
from tuneforge.train.strategy import check_distributed

SRC = Path(__file__).resolve().parents[2] / "src"
LAUNCH_TIMEOUT = 240


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Llama and its tokenizer as a transformers directory every process can load."""
    folder = tmp_path_factory.mktemp("tiny-model")
    model, tokenizer = tiny_chat_model_and_tokenizer()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def settings(model_dir, output_dir, **training):
    values = {"max_steps": 3, "batch_size": 4, "grad_accum": 2, "lr": 1e-2, "log_every": 1, "seed": 7,
              "warmup_steps": 0, **training}
    return {"model": str(model_dir), "device": "cpu", "dtype": "float32", "output_dir": str(output_dir),
            "adapter": {"r": 4, "dropout": 0.0},
            "data": {"train": "arithmetic", "options": {"size": 48}, "max_seq_len": 160, "eval_size": 4},
            "training": values}


def worker_env():
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=f"{SRC}{os.pathsep}{env.get('PYTHONPATH', '')}")
    env.pop("WORLD_SIZE", None)
    return env


def launch(args, cwd, timeout=LAUNCH_TIMEOUT):
    return subprocess.run([sys.executable, *args], cwd=cwd, env=worker_env(), capture_output=True, text=True,
                          timeout=timeout)


def write_config(tmp_path, values, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values))
    return path


def train_records(run_dir):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if "train_loss" in json.loads(line)]


def test_two_processes_take_the_steps_of_one(tmp_path, model_dir, one_torch_thread):
    reference = train(parse_train_config(settings(model_dir, tmp_path / "one")))
    config = write_config(tmp_path, settings(model_dir, tmp_path / "two"))
    result = launch(["-m", "tuneforge", "train", str(config), "--nproc", "2"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    one, two = train_records(reference.run_dir), train_records(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2, 3], "rank 0 alone writes metrics.jsonl, one line per step"
    for key in ("train_loss", "grad_norm", "tokens_seen"):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=1e-5), key
    mine, theirs = (load_file(Path(d) / "adapter" / "adapter_model.safetensors") for d in (tmp_path / "two", reference.run_dir))
    assert mine.keys() == theirs.keys()
    moved = [name for name in mine if not torch.equal(theirs[name], torch.zeros_like(theirs[name]))]
    assert moved, "the reference adapter must have trained for the comparison to mean anything"
    for name in mine:
        torch.testing.assert_close(mine[name], theirs[name], rtol=1e-4, atol=1e-5)  # Adam magnifies reduction-order noise
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "two").iterdir())


def test_a_world_size_that_does_not_divide_the_batch_is_refused():
    config = parse_train_config({"training": {"batch_size": 3}})
    with pytest.raises(ConfigError, match=r"batch_size=3 .* 2 does not divide it"):
        check_distributed(config, 2)
    check_distributed(config, 1)  # one process takes any batch size
    check_distributed(parse_train_config({"training": {"batch_size": 4}}), 2)


@pytest.mark.parametrize("values, key", [
    ({"adapter": {"method": "adalora"}}, "adalora"),
    ({"adapter": {"method": "lora", "init": "eva"}}, "adapter.init='eva'"),
    ({"adapter": {"method": "prompt-tuning"}}, "model-level"),
    ({"adapter": {"method": "full"}, "update_rule": {"method": "lomo"}}, "update_rule.method='lomo'"),
])
def test_methods_not_tested_on_several_processes_are_refused(values, key):
    with pytest.raises(ConfigError, match=key):
        check_distributed(parse_train_config({"training": {"batch_size": 4}, **values}), 2)


MISMATCH_SCRIPT = """
import os, sys
from tuneforge.cli import main
from tuneforge.config import parse_train_config
from tuneforge.errors import ConfigError
from tuneforge.train.strategy import pick_strategy
import torch
config = parse_train_config({"training": {"batch_size": 4, "lr": 1e-4 * (1 + int(os.environ["RANK"]))}})
try:
    pick_strategy(torch.device("cpu"), config)
except ConfigError as exc:
    print(f"rank {os.environ['RANK']}: {exc}", flush=True)
    sys.exit(3)
sys.exit(0)
"""


def test_different_configs_on_the_ranks_fail_on_every_rank(tmp_path):
    script = tmp_path / "mismatch.py"
    script.write_text(MISMATCH_SCRIPT)
    start = time.monotonic()
    result = launch(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)], tmp_path)
    assert time.monotonic() - start < LAUNCH_TIMEOUT
    assert result.returncode != 0
    assert result.stdout.count("were given different configs") == 2, result.stdout + result.stderr[-2000:]


def test_the_launcher_refuses_a_batch_it_cannot_split_before_starting_workers(tmp_path, model_dir, capsys):
    config = write_config(tmp_path, settings(model_dir, tmp_path / "odd", batch_size=3))
    assert main(["train", str(config), "--nproc", "2"]) == 2
    assert "does not divide it" in capsys.readouterr().err
    assert not (tmp_path / "odd").exists()
