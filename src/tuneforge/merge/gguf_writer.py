"""Write a Llama-architecture transformers model as a GGUF file for llama.cpp / Ollama.

The file follows llama.cpp's conventions (gguf-py ``constants.py`` key and tensor names):

- metadata ``llama.*`` (context length, embedding/feed-forward sizes, block count, heads, kv heads,
  rope dimension and base, RMS-norm epsilon, vocab size) and ``general.*`` (name, file type);
- the tokenizer (``tokenizer.ggml.*``): byte-level BPE as model ``gpt2`` with tokens in id order,
  token types (1 normal, 3 control, 4 user-defined, 5 unused padding ids), merges as ``"left right"``, special token ids,
  ``add_bos_token`` and the chat template;
- tensors ``token_embd``, ``blk.N.{attn_norm,attn_q,attn_k,attn_v,attn_output,ffn_norm,ffn_gate,
  ffn_up,ffn_down}``, ``output_norm``, ``output`` (left out when tied to the embedding).

llama.cpp applies rotary embeddings to interleaved pairs (x0, x1), (x2, x3) ...; transformers' Llama
rotates the two halves of each head. The Q and K projection rows are therefore reordered per head:
row (half h, index i) moves to position 2i + h, for the query heads of Q and the key/value heads of K.

1-D tensors are stored as F32, matrices as F16 or Q8_0 (blocks of 32 values: an f16 scale
d = max|x| / 127 and 32 int8 values round(x / d), ggml's ``block_q8_0``); a matrix whose rows are not
a multiple of 32 stays F16.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tuneforge.errors import ConfigError, MissingPackageError

GGUF_TYPES = ("f16", "q8_0")
Q8_BLOCK = 32
LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
# gguf-py's TokenType values.
NORMAL_TOKEN, CONTROL_TOKEN, USER_DEFINED_TOKEN, UNUSED_TOKEN = 1, 3, 4, 5


def _gguf():
    try:
        import gguf
    except ImportError:
        raise MissingPackageError("gguf", "GGUF export") from None
    return gguf


def check_llama(config) -> None:
    """GGUF export knows Llama's tensor layout only; anything else gets a clear refusal before work starts."""
    model_type = getattr(config, "model_type", None)
    if model_type != "llama":
        raise ConfigError(
            f"GGUF export supports Llama-architecture models (model_type 'llama'), but this model is "
            f"'{model_type}' ({', '.join(getattr(config, 'architectures', None) or [])}). "
            "Export it with --format hf instead, then convert with llama.cpp's convert_hf_to_gguf.py"
        )
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ConfigError("GGUF export of Llama models with attention/MLP biases is not supported; use --format hf")
    rope = rope_settings(config)
    if rope.get("rope_type", "default") != "default":
        raise ConfigError(f"GGUF export supports the default rotary embedding, this model uses rope_type "
                          f"'{rope.get('rope_type')}'; use --format hf")


def rope_settings(config) -> dict:
    parameters = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    settings = dict(parameters)
    settings.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return settings


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def interleave_rotary_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Per head, rows [first half; second half] -> rows interleaved pairwise (see the module docstring)."""
    out_features = weight.shape[0]
    half = out_features // heads // 2
    # (heads, 2 halves, half, in) -> (heads, half, 2, in): row i of half h lands at 2i + h.
    return weight.reshape(heads, 2, half, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def gguf_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, float32 tensor in transformers' layout after the rotary reorder), in file order."""
    config = model.config
    state = model.state_dict()
    yield "token_embd.weight", state["model.embed_tokens.weight"]
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        for hf_leaf, gguf_leaf in LAYER_TENSORS.items():
            tensor = state[prefix + hf_leaf]
            if hf_leaf == "self_attn.q_proj.weight":
                tensor = interleave_rotary_rows(tensor, config.num_attention_heads)
            elif hf_leaf == "self_attn.k_proj.weight":
                tensor = interleave_rotary_rows(tensor, config.num_key_value_heads)
            yield f"blk.{layer}.{gguf_leaf}", tensor
    yield "output_norm.weight", state["model.norm.weight"]
    if not _head_is_tied(model):
        yield "output.weight", state["lm_head.weight"]


def _head_is_tied(model: nn.Module) -> bool:
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    return head is None or head.weight.data_ptr() == embedding.weight.data_ptr()


def quantize_q8_0(matrix: np.ndarray) -> np.ndarray:
    """ggml's Q8_0 of a float32 (rows, cols) matrix, cols a multiple of 32 -> uint8 (rows, cols / 32 * 34)."""
    rows, cols = matrix.shape
    blocks = matrix.astype(np.float32).reshape(-1, Q8_BLOCK)
    scale = np.abs(blocks).max(axis=1, keepdims=True) / 127
    with np.errstate(divide="ignore"):
        inverse = np.where(scale == 0, 0, 1 / scale)
    scaled = blocks * inverse
    codes = np.sign(scaled) * np.floor(np.abs(scaled) + 0.5)  # round half away from zero, as ggml's roundf
    packed = np.concatenate([scale.astype(np.float16).view(np.uint8), codes.astype(np.int8).view(np.uint8)], axis=1)
    return packed.reshape(rows, cols // Q8_BLOCK * (2 + Q8_BLOCK))


def _encode(tensor: torch.Tensor, gguf_type: str, gguf) -> tuple[np.ndarray, object]:
    array = tensor.detach().float().cpu().numpy()
    if array.ndim == 1:
        return array.astype(np.float32), gguf.GGMLQuantizationType.F32
    if gguf_type == "q8_0" and array.shape[-1] % Q8_BLOCK == 0:
        quants = getattr(gguf, "quants", None)
        packed = quants.quantize(array, gguf.GGMLQuantizationType.Q8_0) if quants is not None else quantize_q8_0(array)
        return packed, gguf.GGMLQuantizationType.Q8_0
    return array.astype(np.float16), gguf.GGMLQuantizationType.F16


def write_gguf(model: nn.Module, tokenizer, path: str | Path, gguf_type: str = "f16", name: str | None = None) -> Path:
    """Write ``model`` (a plain LlamaForCausalLM) and ``tokenizer`` to ``path`` as one GGUF file."""
    if gguf_type not in GGUF_TYPES:
        raise ConfigError(f"gguf type {gguf_type!r} is not one of {', '.join(GGUF_TYPES)}")
    gguf = _gguf()
    config = model.config
    check_llama(config)
    path = Path(path)
    writer = gguf.GGUFWriter(str(path), "llama")
    try:
        _write_metadata(writer, gguf, config, gguf_type, name)
        _write_tokenizer(writer, tokenizer, config)
        for tensor_name, tensor in gguf_tensors(model):
            array, raw_type = _encode(tensor, gguf_type, gguf)
            writer.add_tensor(tensor_name, array, raw_dtype=raw_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return path


def _write_metadata(writer, gguf, config, gguf_type: str, name: str | None) -> None:
    writer.add_name(name or getattr(config, "_name_or_path", None) or "tuneforge export")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim(config))
    writer.add_rope_freq_base(float(rope_settings(config)["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    file_type = gguf.LlamaFileType.MOSTLY_Q8_0 if gguf_type == "q8_0" else gguf.LlamaFileType.MOSTLY_F16
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _write_tokenizer(writer, tokenizer, config) -> None:
    backend = json.loads(tokenizer.backend_tokenizer.to_str()) if hasattr(tokenizer, "backend_tokenizer") else None
    if backend is None or backend.get("model", {}).get("type") != "BPE":
        raise ConfigError("GGUF export writes byte-level BPE tokenizers (a tokenizer.json with a BPE model, as "
                          "SmolLM2 / Llama 3 use); this tokenizer is not one. Use --format hf instead")
    vocab = tokenizer.get_vocab()
    size = max(config.vocab_size, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]  # ids no token uses (a padded vocab) get placeholders
    types = [UNUSED_TOKEN] * size
    for token, token_id in vocab.items():
        tokens[token_id], types[token_id] = token, NORMAL_TOKEN
    for added in backend.get("added_tokens", []):
        types[added["id"]] = CONTROL_TOKEN if added.get("special") else USER_DEFINED_TOKEN
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(config))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for attribute, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                           ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):
        token_id = getattr(tokenizer, attribute, None)
        if token_id is not None:
            add(int(token_id))
    writer.add_add_bos_token(_adds_bos(tokenizer))
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def _pre_tokenizer_name(config) -> str:
    """llama.cpp picks its pre-tokenizer regex by this name; SmolLM2's is 'smollm', else the generic one."""
    name = str(getattr(config, "_name_or_path", "") or "").lower()
    return "smollm" if "smollm" in name else "default"


def _adds_bos(tokenizer) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == bos
