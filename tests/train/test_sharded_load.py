"""The sharded load of FSDP full finetuning (train/sharded_load.py), in one process.

Oracle: ``load_model`` (transformers' ``from_pretrained``) of the same directory. The two-rank path (each rank
reading only its rows) is checked against one process in test_fsdp.py, whose full-finetuning runs use
it by default.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import sample_ids, tiny_llama

from tuneforge.config import parse_train_config
from tuneforge.errors import ModelLoadError
from tuneforge.models import load_model
from tuneforge.train.sharded_load import ShardedLoad, has_meta_parameters, plan_sharded_load
from tuneforge.train.strategy import DataParallel, FullyShardedDataParallel, SingleProcess


def saved_llama(folder, **overrides):
    tiny_llama(3, **overrides).save_pretrained(folder)
    from tiny_models import build_tiny_tokenizer

    build_tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("tied", [False, True])
def test_filled_model_equals_from_pretrained(tmp_path, tied):
    folder = saved_llama(tmp_path / "model", tie_word_embeddings=tied)
    load = ShardedLoad(str(folder), folder, torch.float32)
    model, _ = load.empty_model()
    assert has_meta_parameters(model)
    assert all(buffer.device.type != "meta" for buffer in model.buffers())  # computed, not loaded
    load.fill(model, torch.device("cpu"))
    assert not has_meta_parameters(model)
    expected = load_model(str(folder), dtype="float32").model.eval()  # transformers' from_pretrained, as training loads
    ids = sample_ids()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(input_ids=ids).logits, expected(input_ids=ids).logits)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    assert model.generation_config.eos_token_id == expected.generation_config.eos_token_id


def test_a_tensor_of_the_wrong_shape_names_the_tensor_and_the_file(tmp_path):
    folder = saved_llama(tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 48  # the weights were saved with 64
    (folder / "config.json").write_text(json.dumps(config))
    load = ShardedLoad(str(folder), folder, torch.float32)
    model, _ = load.empty_model()
    with pytest.raises(ModelLoadError, match=r"mlp\.(gate|up|down)_proj\.weight.*config\.json and the weights disagree"):
        load.fill(model, torch.device("cpu"))


def test_a_missing_tensor_points_to_the_whole_load(tmp_path):
    folder = saved_llama(tmp_path / "model")
    weights = load_file(folder / "model.safetensors")
    del weights["model.norm.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    load = ShardedLoad(str(folder), folder, torch.float32)
    model, _ = load.empty_model()
    with pytest.raises(ModelLoadError, match=r"no tensor 'model\.norm\.weight'.*load_shards: false"):
        load.fill(model, torch.device("cpu"))


def config_for(folder, **distributed):
    return parse_train_config({"model": str(folder), "dtype": "float32", "adapter": {"method": "full"},
                               "distributed": {"strategy": "fsdp", **distributed}})


def test_only_fsdp_full_finetuning_loads_by_shard(tmp_path):
    folder = saved_llama(tmp_path / "model")
    cpu = torch.device("cpu")
    fsdp = FullyShardedDataParallel.__new__(FullyShardedDataParallel)  # no process group needed to plan
    plan = plan_sharded_load(config_for(folder), fsdp)
    assert plan is not None and plan.directory == folder.resolve() and plan.dtype == torch.float32
    assert plan_sharded_load(config_for(folder, fsdp={"load_shards": False}), fsdp) is None
    assert plan_sharded_load(config_for(folder), SingleProcess(cpu)) is None
    assert plan_sharded_load(config_for(folder), DataParallel.__new__(DataParallel)) is None
    lora = parse_train_config({"model": str(folder), "adapter": {"method": "lora"}, "distributed": {"strategy": "fsdp"}})
    assert plan_sharded_load(lora, fsdp) is None
