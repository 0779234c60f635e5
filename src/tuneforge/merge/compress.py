"""Compress LoRA adapters for shipping; a loader turns the compact file back into a normal adapter.

Two settings, both on the LoRA factors (A (r, in), B (out, r)), so the reconstruction is again a
rank-r LoRA that every tool reads:

**Sparse ternary** (ComPEFT, Yadav et al. 2023): per factor, keep the top-k = ⌊density·n⌋ values by
magnitude and replace each kept value by sign · α with one scale per tensor. We compress A and B
separately rather than the product ΔW = BA: the factors have r·(in + out) values against in·out
for ΔW, so at any density the stored bits are r·(in + out)/(in·out) of ΔW's (about 1/18 for r = 16
on a 576×576 layer), and the result stays a LoRA. α = mean |kept values| is the scale that
minimises the squared error for the chosen support and signs (∂/∂α Σ(|v| − α)² = 0); ComPEFT
tunes α = c·σ(τ) on validation data instead, which needs data we may not have. Stored per
factor: a bitmask of the kept positions (n bits), their signs (k bits), α (float32). With
``ternarize=False`` the kept values themselves are stored instead of signs and α; density 1.0 then
round-trips exactly.

**Mixed precision** (Delta-CoMe, Ping et al. 2024): ΔW = s·BA is re-factored by SVD into
B' = U√S, A' = √S Vᵀ; the top ``top_rank`` singular directions (columns of B', rows of A') are
quantized at 8 bits and the rest at ``low_bits``, since the large singular values carry most of
ΔW. Each direction vector gets its own scale (float16: the fraction of its absmax, among a few,
with the least squared error) and symmetric codes in [−(2^(b−1)−1), 2^(b−1)−1], packed b bits per value.

File: ``compressed_adapter.safetensors`` (packed tensors; the metadata key ``tuneforge_compression``
holds the method and per-module shapes) beside the original ``adapter_config.json``.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tuneforge.adapters.peft_format import CONFIG_FILE, read_adapter_tensors
from tuneforge.errors import AdapterError, ConfigError
from tuneforge.merge.loras import LoraAdapter, LoraModule, factors_from_svd, read_lora, write_lora
from tuneforge.merge.methods import check_density
from tuneforge.merge.staging import staged_directory

COMPRESSED_FILE = "compressed_adapter.safetensors"
METADATA_KEY = "tuneforge_compression"
FORMAT_VERSION = 1
HIGH_BITS = 8
CLIP_RATIOS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4)  # candidate fractions of a row's absmax for its grid


@dataclass
class CompressionResult:
    output: Path
    setting: str
    original_bytes: int
    compressed_bytes: int

    @property
    def ratio(self) -> float:
        return self.original_bytes / self.compressed_bytes


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned integer codes < 2^bits -> a uint8 stream, ``bits`` per code, least significant bit first."""
    flat = codes.reshape(-1).to(torch.int64)
    planes = (flat[:, None] >> torch.arange(bits)) & 1  # (n, bits)
    stream = planes.reshape(-1)
    stream = torch.cat([stream, stream.new_zeros(-stream.numel() % 8)])
    return (stream.reshape(-1, 8) << torch.arange(8)).sum(dim=1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    stream = ((packed.to(torch.int64)[:, None] >> torch.arange(8)) & 1).reshape(-1)[: count * bits]
    return (stream.reshape(count, bits) << torch.arange(bits)).sum(dim=1)


def packed_size(count: int, bits: int) -> int:
    return math.ceil(count * bits / 8)


# ---- sparse ternary ---------------------------------------------------------------------------


def sparse_ternary(tensor: torch.Tensor, density: float, ternarize: bool = True) -> dict[str, torch.Tensor]:
    """The stored form of one factor (see the module docstring)."""
    flat = tensor.reshape(-1)
    k = max(1, int(density * flat.numel()))
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[flat.float().abs().topk(k).indices] = True
    kept = flat[keep]  # in position order
    stored = {"mask": pack_bits(keep, 1)}
    if ternarize:
        stored["signs"] = pack_bits(kept < 0, 1)
        stored["scale"] = kept.float().abs().mean().reshape(1)
    else:
        stored["values"] = kept.clone()
    return stored


def from_sparse_ternary(stored: dict[str, torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    count = math.prod(shape)
    keep = unpack_bits(stored["mask"], 1, count).bool()
    out = torch.zeros(count, dtype=torch.float32)
    if "values" in stored:
        out = out.to(stored["values"].dtype)
        out[keep] = stored["values"]
    else:
        negative = unpack_bits(stored["signs"], 1, int(keep.sum())).bool()
        out[keep] = torch.where(negative, -1.0, 1.0) * stored["scale"]
    return out.reshape(shape).to(dtype)


# ---- mixed precision --------------------------------------------------------------------------


def quantize_vectors(vectors: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    """Rows of ``vectors`` -> symmetric absmax codes at ``bits`` per value, one float16 scale per row."""
    levels = 2 ** (bits - 1) - 1
    absmax = vectors.abs().amax(dim=1)  # (rows,)
    best_scale, best_error = None, None
    # At 2-3 bits the absmax grid leaves most values at 0; clipping the largest few often costs less
    # than that, so each row takes the clip ratio with the smallest squared error.
    for clip in CLIP_RATIOS:
        scale = (absmax * clip / levels).to(torch.float16).float()
        error = (_round_to_grid(vectors, scale, levels) * scale[:, None] - vectors).pow(2).sum(dim=1)
        if best_scale is None:
            best_scale, best_error = scale, error
        else:
            better = error < best_error
            best_scale, best_error = torch.where(better, scale, best_scale), torch.minimum(error, best_error)
    codes = _round_to_grid(vectors, best_scale, levels) + levels  # unsigned
    return {"codes": pack_bits(codes, bits), "scales": best_scale.to(torch.float16)}


def _round_to_grid(vectors: torch.Tensor, scale: torch.Tensor, levels: int) -> torch.Tensor:
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.clamp(torch.round(vectors / safe[:, None]), -levels, levels)


def dequantize_vectors(stored: dict[str, torch.Tensor], rows: int, cols: int, bits: int) -> torch.Tensor:
    if rows == 0:
        return torch.zeros(0, cols)
    levels = 2 ** (bits - 1) - 1
    codes = unpack_bits(stored["codes"], bits, rows * cols).reshape(rows, cols).float() - levels
    return codes * stored["scales"].float()[:, None]


def svd_mixed_precision(module: LoraModule, top_rank: int, low_bits: int) -> tuple[dict[str, torch.Tensor], int]:
    """SVD re-factoring of ΔW with the top directions at 8 bits and the rest at ``low_bits``."""
    u, s, vh = torch.linalg.svd(module.delta(), full_matrices=False)
    a, b = factors_from_svd(u, s, vh, module.rank)  # (r, in), (out, r)
    top = min(top_rank, a.shape[0])
    stored = {}
    for part, rows, bits in (("hi", slice(0, top), HIGH_BITS), ("lo", slice(top, None), low_bits)):
        if a[rows].shape[0] == 0:
            continue
        for factor, vectors in (("A", a[rows]), ("B", b[:, rows].T)):
            for leaf, tensor in quantize_vectors(vectors, bits).items():
                stored[f"{factor}.{part}.{leaf}"] = tensor
    return stored, top


def from_mixed_precision(stored: dict[str, torch.Tensor], rank: int, top: int, out_features: int,
                         in_features: int, low_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    def factor(name, cols):
        parts = [dequantize_vectors({k.split(".")[-1]: v for k, v in stored.items() if k.startswith(f"{name}.{p}.")},
                                    n, cols, bits)
                 for p, n, bits in (("hi", top, HIGH_BITS), ("lo", rank - top, low_bits))]
        return torch.cat(parts, dim=0)

    return factor("A", in_features), factor("B", out_features).T


# ---- files ------------------------------------------------------------------------------------


def compress_adapter(adapter_dir: str | Path, output_dir: str | Path, *, density: float = 0.1, ternarize: bool = True,
                     mixed_precision: bool = False, top_rank: int = 2, low_bits: int = 3,
                     overwrite: bool = False) -> CompressionResult:
    """Write the compressed form of a LoRA adapter; returns the sizes (tensor bytes) before and after."""
    adapter_dir = Path(adapter_dir)
    if mixed_precision:
        if low_bits not in (2, 3, 4):
            raise ConfigError(f"low_bits={low_bits} must be 2, 3 or 4 (the top directions get {HIGH_BITS})")
        if top_rank < 0:
            raise ConfigError(f"top_rank={top_rank} must be 0 or more")
        setting = f"mixed precision ({HIGH_BITS}-bit top {top_rank} directions, {low_bits}-bit rest)"
    else:
        density = check_density(density, "compression")
        setting = f"sparse {'ternary' if ternarize else 'values'}, density {density:g}"
    adapter = read_lora(adapter_dir)
    original = sum(t.numel() * t.element_size() for t in read_adapter_tensors(adapter_dir).values())
    tensors, modules = {}, {}
    for name, module in adapter.modules.items():
        record = {"rank": module.rank, "out": module.shape[0], "in": module.shape[1], "scaling": module.scaling,
                  "embedding": module.embedding, "dtype": str(module.A.dtype).removeprefix("torch.")}
        if mixed_precision:
            stored, record["top"] = svd_mixed_precision(module, top_rank, low_bits)
        else:
            stored = {f"{factor}.{leaf}": t for factor, weight in (("A", module.A), ("B", module.B))
                      for leaf, t in sparse_ternary(weight, density, ternarize).items()}
        tensors.update({f"{name}.{key}": t.contiguous() for key, t in stored.items()})
        modules[name] = record
    header = {"format": FORMAT_VERSION, "method": "mixed_precision" if mixed_precision else "sparse_ternary",
              "density": density, "ternarize": ternarize, "low_bits": low_bits, "modules": modules,
              "fan_in_fan_out": adapter.fan_in_fan_out, "base_model": adapter.base_model, "task_type": adapter.task_type}
    with staged_directory(output_dir, overwrite) as staging:
        save_file(tensors, str(staging / COMPRESSED_FILE), metadata={METADATA_KEY: json.dumps(header)})
        (staging / CONFIG_FILE).write_text((adapter_dir / CONFIG_FILE).read_text(encoding="utf-8"), encoding="utf-8")
    compressed = sum(t.numel() * t.element_size() for t in tensors.values())
    return CompressionResult(Path(output_dir), setting, original, compressed)


def load_compressed(directory: str | Path) -> LoraAdapter:
    """The adapter a compressed directory stands for, as plain LoRA factors."""
    path = Path(directory) / COMPRESSED_FILE
    if not path.is_file():
        raise AdapterError(f"{directory} has no {COMPRESSED_FILE}; it was not written by tuneforge compress")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if METADATA_KEY not in metadata:
            raise AdapterError(f"{path} has no '{METADATA_KEY}' metadata; it was not written by tuneforge compress")
        header = json.loads(metadata[METADATA_KEY])
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    if header.get("format") != FORMAT_VERSION:
        raise AdapterError(f"{path} is compression format {header.get('format')}; this tuneforge reads {FORMAT_VERSION}")
    modules = {}
    for name, record in header["modules"].items():
        own = {key[len(name) + 1:]: t for key, t in tensors.items() if key.startswith(name + ".")}
        dtype = getattr(torch, record["dtype"])
        r, out_features, in_features = record["rank"], record["out"], record["in"]
        if header["method"] == "mixed_precision":
            a, b = from_mixed_precision(own, r, record["top"], out_features, in_features, header["low_bits"])
            modules[name] = LoraModule(a.to(dtype), b.to(dtype), 1.0, record["embedding"])
        else:
            factors = [from_sparse_ternary({k[2:]: t for k, t in own.items() if k.startswith(f"{f}.")}, shape, dtype)
                       for f, shape in (("A", (r, in_features)), ("B", (out_features, r)))]
            modules[name] = LoraModule(factors[0], factors[1], record["scaling"], record["embedding"])
    return LoraAdapter(modules, fan_in_fan_out=header["fan_in_fan_out"], base_model=header.get("base_model"),
                       task_type=header.get("task_type"), source=str(directory))


def decompress_adapter(directory: str | Path, output_dir: str | Path, overwrite: bool = False) -> Path:
    """Write the reconstructed adapter as an ordinary PEFT-format LoRA directory."""
    return write_lora(load_compressed(directory), output_dir, overwrite=overwrite)


def measure_output_difference(original_dir: str | Path, compressed_dir: str | Path, *, base: str | None = None,
                              data: str = "arithmetic", limit: int = 16, model_and_tokenizer=None) -> float:
    """Mean KL(original ‖ reconstructed) of next-token distributions over ``limit`` eval examples."""
    from tuneforge.adapters import delete_adapter, load_adapter
    from tuneforge.data import load_examples
    from tuneforge.merge.export import compare_logits

    if model_and_tokenizer is None:
        from tuneforge.models import load_model

        base = base or read_lora(original_dir).base_model
        if not base:
            raise ConfigError("the adapter does not record its base model; pass --model")
        loaded = load_model(base, dtype="float32")
        model_and_tokenizer = (loaded.model, loaded.tokenizer)
    model, tokenizer = model_and_tokenizer
    examples = load_examples(data, split="eval").examples[:limit]
    texts = [_example_text(e, tokenizer) for e in examples]
    batch = dict(tokenizer(texts, return_tensors="pt", padding=True))
    logits = {}
    for name, directory in (("original", Path(original_dir)), ("compressed", None)):
        with tempfile.TemporaryDirectory() as scratch:
            directory = directory or decompress_adapter(compressed_dir, Path(scratch) / "rebuilt")
            load_adapter(model, directory, name)
        try:
            with torch.no_grad():
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            logits[name] = out[batch["attention_mask"].bool()]
        finally:
            delete_adapter(model, name)  # the model is left as it came
    return compare_logits(logits["original"], logits["compressed"]).mean_kl


def _example_text(example, tokenizer) -> str:
    if example.text is not None:
        return example.text
    messages = [{"role": m.role, "content": m.content} for m in example.messages]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)
