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
from tiny_models import save_tiny_chat_model

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
    return Path(save_tiny_chat_model(tmp_path_factory.mktemp("tiny-model")))


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory):
    """Another tiny Llama (narrower hidden size) with the same tokenizer: its checkpoints fit no other model."""
    from tiny_models import build_tiny_tokenizer, CHATML_TEMPLATE, tiny_llama

    folder = tmp_path_factory.mktemp("other-model")
    tokenizer = build_tiny_tokenizer(chat_template=CHATML_TEMPLATE)
    tiny_llama(1, vocab_size=len(tokenizer), hidden_size=32).save_pretrained(folder)
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
    env.update(OMP_NUM_THREADS="1", COLUMNS="400", PYTHONPATH=f"{SRC}{os.pathsep}{env.get('PYTHONPATH', '')}")
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


def adapter_tensors(run_dir):
    return load_file(Path(run_dir) / "adapter" / "adapter_model.safetensors")


def assert_same_steps(records, expected):
    assert [r["step"] for r in records] == [r["step"] for r in expected], "rank 0 alone writes metrics.jsonl"
    for key in ("train_loss", "grad_norm", "tokens_seen"):
        assert [r[key] for r in records] == pytest.approx([r[key] for r in expected], rel=1e-5), key


def assert_same_adapter(mine, theirs):
    assert mine.keys() == theirs.keys()
    for name in mine:
        torch.testing.assert_close(mine[name], theirs[name], rtol=1e-4, atol=1e-5)  # Adam magnifies reduction-order noise


def test_two_processes_take_the_steps_of_one_and_resume_across_world_sizes(tmp_path, model_dir, one_torch_thread):
    one_settings = settings(model_dir, tmp_path / "one", max_steps=4, save_every=2)
    reference = train(parse_train_config(one_settings))
    expected, expected_adapter = train_records(reference.run_dir), adapter_tensors(reference.run_dir)
    assert any(t.abs().max() > 0 for t in expected_adapter.values()), "the adapter must have trained"

    # 2 ranks x 2 rows per micro-batch == 1 rank x 4 rows.
    config = write_config(tmp_path, settings(model_dir, tmp_path / "two", max_steps=4, save_every=2))
    result = launch(["-m", "tuneforge", "train", str(config), "--nproc", "2"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_steps(train_records(tmp_path / "two"), expected)
    assert_same_adapter(adapter_tensors(tmp_path / "two"), expected_adapter)
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "two").iterdir())

    # 2 -> 1: the 2-rank run's step-2 checkpoint resumed in one process takes the same steps 3 and 4.
    resumed = []
    train(parse_train_config(settings(model_dir, tmp_path / "two", max_steps=4, save_every=2)), resume=True,
          on_step=lambda step, loss: resumed.append(loss))
    assert resumed == pytest.approx([r["train_loss"] for r in expected[2:]], rel=1e-5)
    assert_same_adapter(adapter_tensors(tmp_path / "two"), expected_adapter)

    # 1 -> 2: the 1-process run's step-2 checkpoint resumed on two ranks.
    config = write_config(tmp_path, one_settings, name="one.yaml")
    result = launch(["-m", "tuneforge", "train", str(config), "--nproc", "2", "--resume"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_steps(train_records(tmp_path / "one"), expected)
    assert_same_adapter(adapter_tensors(tmp_path / "one"), expected_adapter)


def test_a_checkpoint_of_another_model_is_refused_on_every_rank(tmp_path, model_dir, other_model_dir, one_torch_thread):
    train(parse_train_config(settings(model_dir, tmp_path / "run", max_steps=2, save_every=1)))
    # --resume-anyway skips the saved-config comparison, so the checkpoint's tensors meet the other model.
    config = write_config(tmp_path, settings(other_model_dir, tmp_path / "run", max_steps=2, save_every=1))
    start = time.monotonic()
    result = launch(["-m", "tuneforge", "train", str(config), "--nproc", "2", "--resume-anyway"], tmp_path)
    assert time.monotonic() - start < LAUNCH_TIMEOUT
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.count("has shape") == 2, result.stderr[-3000:]  # one clear error per rank, no traceback
    assert "Traceback" not in result.stderr


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


def worker_pids(launcher_pid):
    """{RANK: pid} of the elastic agent's worker processes (children of the launcher process)."""
    workers = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        rank = next((item[5:].decode() for item in environ if item.startswith(b"RANK=")), None)
        if parent == launcher_pid and rank is not None:
            workers[int(rank)] = int(entry.name)
    return workers


def test_a_killed_rank_ends_the_job_with_the_last_checkpoint_intact(tmp_path, model_dir):
    import signal

    from tuneforge.train.checkpoint import latest_checkpoint, read_trainer_state

    run_dir = tmp_path / "killed"
    config = write_config(tmp_path, settings(model_dir, run_dir, max_steps=500, save_every=2, keep_checkpoints=2))
    launcher = subprocess.Popen([sys.executable, "-m", "tuneforge", "train", str(config), "--nproc", "2"], cwd=tmp_path,
                                env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        while latest_checkpoint(run_dir) is None:
            assert launcher.poll() is None and time.monotonic() < deadline, "the job never wrote a checkpoint"
            time.sleep(0.5)
        os.kill(worker_pids(launcher.pid)[1], signal.SIGKILL)
        killed_at = time.monotonic()
        _, stderr = launcher.communicate(timeout=90)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0
    assert time.monotonic() - killed_at < 90
    assert "failed with exit code" in stderr, stderr[-2000:]  # the launcher names the failed rank, no traceback
    last = latest_checkpoint(run_dir)
    state = read_trainer_state(last)
    assert state["state"]["step"] == int(last.name.split("-")[1]) and state["state"]["step"] % 2 == 0
    assert load_file(last / "adapter" / "adapter_model.safetensors")
