"""The peft round trip the interop tests share: our adapter, saved, loaded by peft, equal logits."""

from __future__ import annotations

import copy
import warnings

import peft
import torch
from tiny_models import perturb_trainable, sample_ids

from tuneforge.adapters import add_adapter, save_adapter


def assert_peft_loads_ours(base, config, directory, *, scale: float = 0.2, atol: float = 1e-5) -> None:
    """Add ``config`` to a copy of ``base``, move it off its init, save it, and check that
    ``peft.PeftModel.from_pretrained`` on a fresh copy of ``base`` gives the same logits."""
    model = copy.deepcopy(base)
    add_adapter(model, config)
    perturb_trainable(model, scale=scale)
    ids = sample_ids()
    save_adapter(model, directory)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), directory).eval()
    with torch.no_grad():
        diff = (theirs(ids).logits - model(ids).logits).abs().max().item()
    assert diff <= atol, f"peft's logits differ by {diff}"
