"""Training runs that never lose work (issue 15, part 3): non-finite steps, --overwrite, checkpoint
safety, config checks on --resume. Each test runs the real loop on a tiny Llama."""

from __future__ import annotations

import errno
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_chat_model_and_tokenizer

import tuneforge.train.objectives.base as objective_module  # the SFT objective computes the loop's loss
from tuneforge.config import parse_train_config
from tuneforge.errors import ConfigError, TuneforgeError
from tuneforge.train import train
from tuneforge.train.checkpoint import CHECKPOINTS, STATE_FILE, list_checkpoints
from tuneforge.train.metrics import read_metrics


@pytest.fixture(autouse=True)
def _single_thread(one_torch_thread):
    yield


def config(tmp_path, name="run", data=None, **training):
    settings = {"max_steps": 4, "batch_size": 4, "lr": 5e-3, "log_every": 1, "save_every": None, "seed": 3,
                "keep_checkpoints": 10}
    settings.update(training)
    return parse_train_config({
        "output_dir": str(tmp_path / name),
        "adapter": {"r": 4},
        "data": {"train": "arithmetic", "options": {"size": 24}, "max_seq_len": 160, "eval_size": 4, **(data or {})},
        "training": settings,
    })


class Recorder:
    """on_step callback keeping a copy of the trainable weights after every step."""

    def __init__(self, model, actions=None):
        self.model, self.actions = model, actions or {}
        self.weights = {0: self.snapshot()}
        self.losses = {}

    def snapshot(self):
        return {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    def __call__(self, step, loss):
        self.losses[step] = loss
        self.weights[step] = self.snapshot()
        if step in self.actions:
            self.actions[step](self.model)


def run(cfg, actions=None, **kwargs):
    model, tokenizer = tiny_chat_model_and_tokenizer()
    recorder = Recorder(model, actions)
    summary = train(cfg, model_and_tokenizer=(model, tokenizer), on_step=recorder, **kwargs)
    return summary, recorder


def same(a, b):
    return all(torch.equal(a[n], b[n]) for n in a) if a.keys() == b.keys() else False


def poison_losses(monkeypatch, bad_calls):
    """Make the loop's loss NaN on the given 1-based forward calls (one call per micro-batch)."""
    real = objective_module.token_loss_sum
    calls = {"n": 0}

    def loss_sum(model, batch, chunk):
        calls["n"] += 1
        total, count = real(model, batch, chunk)
        return (total * float("nan"), count) if calls["n"] in bad_calls else (total, count)

    monkeypatch.setattr(objective_module, "token_loss_sum", loss_sum)


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# Non-finite loss or gradient norm


def test_a_nan_loss_skips_the_update_and_is_counted_and_logged(tmp_path, monkeypatch):
    poison_losses(monkeypatch, {2})  # step 2's only micro-batch
    summary, recorder = run(config(tmp_path))
    weights = recorder.weights
    assert same(weights[2], weights[1]), "the optimizer moved the weights on a NaN step"
    assert not same(weights[3], weights[2]), "training did not go on after the skipped step"
    assert all(torch.isfinite(t).all() for t in weights[4].values())
    assert summary.steps == 4 and summary.nonfinite_steps == 1
    step2 = next(r for r in metrics(summary.run_dir) if r["step"] == 2 and "lr" in r)
    assert step2["skipped"] is True and step2["train_loss"] is None and step2["nonfinite_steps"] == 1
    tensors = load_file(str(summary.adapter_dir / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in tensors.values())


def test_an_infinite_gradient_with_a_finite_loss_skips_the_update(tmp_path):
    def blow_up_next_backward(model):
        param = next(p for n, p in model.named_parameters() if p.requires_grad and "lora_A" in n)
        fired = []
        param.register_hook(lambda grad: grad if fired else (fired.append(1) or grad * float("inf")))

    summary, recorder = run(config(tmp_path), actions={1: blow_up_next_backward})
    assert same(recorder.weights[2], recorder.weights[1])
    assert math.isfinite(recorder.losses[2])
    step2 = next(r for r in metrics(summary.run_dir) if r["step"] == 2 and "lr" in r)
    assert step2["skipped"] is True and step2["grad_norm"] is None and math.isfinite(step2["train_loss"])
    assert summary.nonfinite_steps == 1 and not same(recorder.weights[3], recorder.weights[2])


def test_the_run_stops_after_max_nonfinite_steps_in_a_row(tmp_path, monkeypatch):
    poison_losses(monkeypatch, set(range(2, 100)))
    cfg = config(tmp_path, max_steps=10, max_nonfinite_steps=3)
    with pytest.raises(TuneforgeError, match=r"stopped at step 4: 3 optimizer steps in a row had a non-finite loss "
                                             r"\(nan\).*training.max_nonfinite_steps=3"):
        run(cfg)
    assert not (tmp_path / "run" / "adapter").exists()


def test_a_streak_is_reset_by_a_good_step(tmp_path, monkeypatch):
    poison_losses(monkeypatch, {1, 2, 4, 5})  # two in a row at most
    summary, _ = run(config(tmp_path, max_steps=6, max_nonfinite_steps=3))
    assert summary.steps == 6 and summary.nonfinite_steps == 4


def _nan_into_lora_b(model):
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(float("nan"))


def test_a_nan_adapter_never_overwrites_a_good_checkpoint(tmp_path):
    cfg = config(tmp_path, max_steps=8, save_every=2, max_nonfinite_steps=100)
    with pytest.raises(TuneforgeError, match=r"NaN or inf at step 4 .*lora_B.*was not written; the last good "
                                             r"checkpoint, .*step-0000002, is kept"):
        run(cfg, actions={3: _nan_into_lora_b})
    run_dir = tmp_path / "run"
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-0000002"]
    tensors = load_file(str(run_dir / CHECKPOINTS / "step-0000002" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in tensors.values())
    assert not (run_dir / "adapter").exists()


def test_a_nan_adapter_never_becomes_the_final_adapter(tmp_path):
    cfg = config(tmp_path, max_steps=3, max_nonfinite_steps=100)
    with pytest.raises(TuneforgeError, match="NaN or inf at step 3 .*the final adapter was not written"):
        run(cfg, actions={3: _nan_into_lora_b})
    assert not (tmp_path / "run" / "adapter").exists()


def test_fp16_scales_the_loss_with_a_grad_scaler(tmp_path, monkeypatch):
    scaled = []
    real_scale = torch.amp.GradScaler.scale
    monkeypatch.setattr(torch.amp.GradScaler, "scale", lambda self, loss: scaled.append(self.get_scale()) or real_scale(self, loss))
    cfg = config(tmp_path, max_steps=3, save_every=2, precision="fp16", grad_accum=2, batch_size=2)
    summary, recorder = run(cfg)
    assert len(scaled) == 6, "every micro-batch's loss goes through the scaler"
    saved = torch.load(list_checkpoints(summary.run_dir)[0] / STATE_FILE, weights_only=True)
    assert saved["scaler"]["scale"] > 1  # the scaler state travels with the checkpoint
    assert not same(recorder.weights[3], recorder.weights[0])


# ---------------------------------------------------------------------------------------------
# --overwrite


def _finished_run(tmp_path):
    summary, _ = run(config(tmp_path, max_steps=1))
    before = {p.relative_to(summary.run_dir): p.read_bytes() for p in summary.run_dir.rglob("*") if p.is_file()}
    return summary.run_dir, before


def _contents(run_dir):
    return {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}


@pytest.mark.parametrize("change, error", [
    ({"data": {"train": "missing.jsonl"}}, "missing.jsonl"),
    ({"adapter": {"r": 4, "target_modules": ["qproj"]}}, "qproj"),
])
def test_overwrite_deletes_nothing_when_data_or_model_setup_fails(tmp_path, change, error):
    run_dir, before = _finished_run(tmp_path)
    cfg = config(tmp_path, max_steps=1)
    cfg = parse_train_config({**cfg.model_dump(mode="json"), **change,
                              "data": {**cfg.data.model_dump(mode="json"), **change.get("data", {})}})
    with pytest.raises(TuneforgeError, match=error):
        run(cfg, overwrite=True)
    assert _contents(run_dir) == before


def test_overwrite_deletes_nothing_when_the_model_does_not_load(tmp_path):
    run_dir, before = _finished_run(tmp_path)
    cfg = config(tmp_path, max_steps=1)
    cfg.model = str(tmp_path / "no-such-model")
    with pytest.raises(TuneforgeError):
        train(cfg, overwrite=True)
    assert _contents(run_dir) == before


@pytest.mark.parametrize("save_every", [2, None])
def test_overwrite_keeps_the_old_run_aside_until_the_first_checkpoint_or_the_end(tmp_path, save_every):
    run_dir, before = _finished_run(tmp_path)
    seen = {}

    def look(step):
        def record(model):
            seen[step] = [_contents(p) for p in run_dir.iterdir() if p.name.startswith(".replaced-")]
        return record

    summary, _ = run(config(tmp_path, max_steps=4, save_every=save_every), overwrite=True,
                     actions={1: look(1), 3: look(3)})
    assert seen[1] == [before], "before its first checkpoint the new run must keep the old one aside, whole"
    assert seen[3] == ([] if save_every else [before]), "the old run goes once the new run has a checkpoint"
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".replaced-")], "the old run outlived the new run's end"
    assert summary.steps == 4 and [r["step"] for r in metrics(run_dir) if "lr" in r] == [1, 2, 3, 4]


def test_an_overwriting_run_that_fails_early_leaves_the_old_run_aside(tmp_path, monkeypatch):
    run_dir, before = _finished_run(tmp_path)
    poison_losses(monkeypatch, set(range(1, 100)))
    with pytest.raises(TuneforgeError, match="in a row"):
        run(config(tmp_path, max_steps=4, save_every=2, max_nonfinite_steps=1), overwrite=True)
    [aside] = [p for p in run_dir.iterdir() if p.name.startswith(".replaced-")]
    assert _contents(aside) == before
    with pytest.raises(ConfigError, match=rf"still kept in {aside.name}"):
        run(config(tmp_path, max_steps=1))


# ---------------------------------------------------------------------------------------------
# Checkpoint safety


def _interrupted_run(tmp_path, at=2, **training):
    def stop(model):
        raise KeyboardInterrupt

    cfg = config(tmp_path, max_steps=4, **training)
    summary, _ = run(cfg, actions={at: stop})
    assert summary.interrupted
    return cfg, summary.run_dir


def test_checkpoints_hold_only_tensors_and_plain_values(tmp_path):
    _, run_dir = _interrupted_run(tmp_path)
    saved = torch.load(list_checkpoints(run_dir)[-1] / STATE_FILE, weights_only=True)
    assert isinstance(saved["rng"]["python"]["internal"], torch.Tensor)
    assert isinstance(saved["rng"]["numpy"]["keys"], torch.Tensor)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_resume_never_runs_code_from_a_checkpoint(tmp_path):
    cfg, run_dir = _interrupted_run(tmp_path)
    marker = tmp_path / "code-ran"
    state_file = list_checkpoints(run_dir)[-1] / STATE_FILE
    saved = torch.load(state_file, weights_only=False)  # the test's own file
    saved["payload"] = _RunsCode(marker)
    torch.save(saved, state_file)
    with pytest.raises(TuneforgeError, match="cannot be read safely.*only tensors and plain values"):
        run(cfg, resume=True)
    assert not marker.exists(), "loading the checkpoint executed code"


def test_resume_tolerates_a_torn_last_metrics_line(tmp_path):
    cfg, run_dir = _interrupted_run(tmp_path)
    with (run_dir / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 3, "train_lo')  # the process died mid-write
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if "lr" in r] == [1, 2]
    summary, _ = run(cfg, resume=True)
    assert summary.steps == 4
    assert [r["step"] for r in metrics(run_dir) if "lr" in r] == [1, 2, 3, 4]


def test_a_bad_metrics_line_before_the_last_is_an_error_naming_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(TuneforgeError, match="metrics.jsonl:2 is not a JSON line"):
        read_metrics(path)


def test_files_are_fsynced_before_a_checkpoint_or_the_adapter_is_renamed(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))) or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda src, dst: events.append(("replace", str(src), str(dst))) or real_replace(src, dst))
    run(config(tmp_path, max_steps=3, save_every=2))
    [rename] = [i for i, e in enumerate(events) if e[0] == "replace" and e[2].endswith(f"{CHECKPOINTS}/step-0000002")]
    tmp_dir = events[rename][1]
    synced = {e[1] for e in events[:rename] if e[0] == "fsync"}
    for name in (STATE_FILE, "adapter/adapter_model.safetensors", "adapter/adapter_config.json"):
        assert f"{tmp_dir}/{name}" in synced, f"{name} was not fsynced before the rename"
    assert tmp_dir in synced
    assert any(e == ("fsync", str(tmp_path / "run" / CHECKPOINTS)) for e in events[rename:]), "the rename itself was not fsynced"
    [final] = [i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(tmp_path / "run" / "adapter")]
    synced = {e[1] for e in events[:final] if e[0] == "fsync"}
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert f"{events[final][1]}/{name}" in synced, f"the final adapter's {name} was not fsynced before its rename"


def test_stale_temp_folders_are_cleaned_up(tmp_path):
    cfg, run_dir = _interrupted_run(tmp_path)
    stale = run_dir / CHECKPOINTS / ".tmp-step-0000009-99999"
    (stale / "adapter").mkdir(parents=True)
    (stale / "adapter" / "adapter_model.safetensors").write_bytes(b"half")
    stale_adapter = run_dir / ".tmp-adapter-99999"
    stale_adapter.mkdir()
    run(cfg, resume=True)
    assert not stale.exists() and not stale_adapter.exists()


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch):
    real_save = torch.save

    def save(obj, path, *args, **kwargs):
        if "step-0000004" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(TuneforgeError) as caught:
        run(config(tmp_path, max_steps=6, save_every=2))
    message = str(caught.value)
    assert "could not save checkpoint step-0000004" in message and "the disk is full" in message
    assert "step-0000002 is kept" in message and "--resume" in message
    root = tmp_path / "run" / CHECKPOINTS
    assert [p.name for p in root.iterdir()] == ["step-0000002"], "the failed save left something behind"
    torch.load(root / "step-0000002" / STATE_FILE, weights_only=True)


# ---------------------------------------------------------------------------------------------
# --resume compares configs


def test_resume_refuses_changed_data_batch_size_max_steps_or_adapter(tmp_path):
    cfg, run_dir = _interrupted_run(tmp_path)
    saved_config = (run_dir / "config.yaml").read_text()
    changed = config(tmp_path, max_steps=5, batch_size=2, lr=1e-3, data={"options": {"size": 30}})
    changed.adapter.r = 8
    with pytest.raises(ConfigError) as caught:
        run(changed, resume=True)
    message = str(caught.value)
    for key in ("data.options.size: 24 -> 30", "training.batch_size: 4 -> 2", "training.max_steps: 4 -> 5", "adapter.r: 4 -> 8"):
        assert key in message
    assert "training.lr" not in message, "a new learning rate does not invalidate the checkpoints"
    assert "--resume-anyway" in message
    assert (run_dir / "config.yaml").read_text() == saved_config


def test_resume_anyway_and_harmless_changes_continue(tmp_path):
    cfg, run_dir = _interrupted_run(tmp_path)
    summary, _ = run(config(tmp_path, max_steps=4, lr=1e-3, log_every=2), resume=True)
    assert summary.steps == 4
    cfg, run_dir = _interrupted_run(tmp_path / "second")
    summary, _ = run(config(tmp_path / "second", max_steps=5), resume_anyway=True)
    assert summary.steps == 5


def test_fp16_overflows_while_the_scaler_searches_do_not_stop_the_run():
    from tuneforge.train.nonfinite import NonFiniteGuard

    guard = NonFiniteGuard(max_in_a_row=2)
    inf, nan = float("inf"), float("nan")
    # GradScaler starts at 2**16 and halves on each overflow: those skips are its search, not a failing run.
    for scale in (2.0**16, 2.0**15, 2.0**14):
        assert not guard.allows(1.5, inf, step=1, loss_scale=scale)
    assert guard.in_a_row == 0 and guard.skipped == 3
    assert not guard.allows(nan, nan, step=4, loss_scale=2.0**13)  # a NaN loss is never the scaler's doing
    with pytest.raises(TuneforgeError, match="2 optimizer steps in a row"):
        guard.allows(1.5, inf, step=5, loss_scale=1.0)  # a scale of 1 no longer explains an overflow
