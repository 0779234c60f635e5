"""Trainable tokens: only the chosen rows change, a tied head follows them, peft interop both ways."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from safetensors.torch import load_file
from tiny_models import perturb_trainable, sample_ids, tiny_gpt2, tiny_llama

from tuneforge.adapters import add_adapter, load_adapter, merge_and_unload, save_adapter
from tuneforge.adapters.selective.trainable_tokens import TrainableTokensConfig
from tuneforge.errors import AdapterError, ConfigError

TOKENS = [2, 7, 40]


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_only_the_chosen_rows_are_stored_and_merged(tmp_path):
    base = tiny_llama()
    model = copy.deepcopy(base)
    add_adapter(model, TrainableTokensConfig(token_indices=TOKENS))
    perturb_trainable(model, scale=0.5)
    save_adapter(model, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert list(tensors) == ["base_model.model.model.embed_tokens.trainable_tokens_delta"]
    assert tensors["base_model.model.model.embed_tokens.trainable_tokens_delta"].shape == (3, 32)
    merged = merge_and_unload(model)
    changed = (merged.model.embed_tokens.weight != base.model.embed_tokens.weight).any(dim=1)
    assert changed.nonzero().flatten().tolist() == TOKENS
    assert torch.equal(merged.lm_head.weight, base.lm_head.weight)  # untied head untouched


def test_lookup_returns_trained_rows_for_chosen_tokens_only():
    base = tiny_llama()
    model = copy.deepcopy(base)
    add_adapter(model, TrainableTokensConfig(token_indices=TOKENS))
    perturb_trainable(model, scale=0.5)
    rows = model.model.embed_tokens.adapters["default"].trainable_tokens_delta.detach()
    ids = torch.tensor([[2, 3, 40, 7, 2]])
    with torch.no_grad():
        out = model.model.embed_tokens(ids)
    expected = base.model.embed_tokens(ids).detach().clone()
    expected[0, [0, 4]] = rows[0]
    expected[0, 2], expected[0, 3] = rows[2], rows[1]
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_tied_head_uses_the_trained_rows_for_those_logits():
    base = tiny_gpt2()
    model = copy.deepcopy(base)
    add_adapter(model, TrainableTokensConfig(token_indices=TOKENS))
    perturb_trainable(model, scale=0.5)
    rows = model.transformer.wte.adapters["default"].trainable_tokens_delta.detach()
    assert model.lm_head.adapters["default"].file_tensors() == {}
    h = torch.randn(2, 32)
    with torch.no_grad():
        out = model.lm_head(h)
    expected = h @ base.lm_head.weight.T
    expected[:, TOKENS] = h @ rows.T
    torch.testing.assert_close(out, expected)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["transformer.wte.adapters.default.trainable_tokens_delta"]


def test_bad_token_indices_are_clear_errors():
    with pytest.raises(AdapterError, match=r"token_indices \[128, 500\] are outside the vocabulary.*indices 0\.\.127"):
        add_adapter(tiny_llama(), TrainableTokensConfig(token_indices=[1, 128, 500]))
    from tuneforge.adapters.config import validate_config

    with pytest.raises(ConfigError, match="token_indices"):
        validate_config(TrainableTokensConfig, {"token_indices": [-1]}, "run.yaml")


INTEROP = [("llama-untied", tiny_llama), ("gpt2-tied", tiny_gpt2)]


@pytest.mark.parametrize("case_id,make_model", INTEROP, ids=[c[0] for c in INTEROP])
def test_tuneforge_tokens_load_in_peft(case_id, make_model, tmp_path):
    base = make_model()
    model = copy.deepcopy(base)
    add_adapter(model, TrainableTokensConfig(token_indices=TOKENS))
    perturb_trainable(model, scale=0.5)
    save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    ids = torch.cat([sample_ids(), torch.tensor([TOKENS * 3])[:, :9]])
    diff = (logits(theirs, ids) - logits(model, ids)).abs().max().item()
    assert diff <= 1e-5, f"peft's logits differ by {diff}"
    assert (logits(model, ids) - logits(base, ids)).abs().max() > 1e-3


@pytest.mark.parametrize("case_id,make_model", INTEROP, ids=[c[0] for c in INTEROP])
def test_peft_tokens_load_in_tuneforge(case_id, make_model, tmp_path):
    base = make_model()
    target = "wte" if case_id.startswith("gpt2") else "embed_tokens"
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.TrainableTokensConfig(token_indices=TOKENS, target_modules=[target]))
    perturb_trainable(theirs, scale=0.5)
    theirs.eval()
    ids = torch.cat([sample_ids(), torch.tensor([TOKENS * 3])[:, :9]])
    expected = logits(theirs, ids)
    theirs.save_pretrained(tmp_path)
    model = copy.deepcopy(base)
    load_adapter(model, tmp_path)
    diff = (logits(model, ids) - expected).abs().max().item()
    assert diff <= 1e-5, f"tuneforge's logits differ from peft's by {diff}"
