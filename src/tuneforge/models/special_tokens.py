"""Pad and stop tokens: batching needs a pad token, and `generate` must stop where a chat turn ends."""

from __future__ import annotations

from transformers import GenerationConfig, PreTrainedTokenizerBase

from tuneforge.errors import ModelLoadError

# Tokens that close an assistant turn in common chat templates (ChatML, Gemma, Llama 3, Phi-3).
# Some checkpoints name only the end-of-document token as eos, so `generate` would run past the
# answer into a new turn; a marker counts only when the model's own chat template writes it.
END_OF_TURN_MARKERS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>")


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase, source: str) -> None:
    """Use the eos token for padding when the tokenizer has no pad token (padded positions are masked)."""
    if tokenizer.pad_token is not None:
        return
    if tokenizer.eos_token is None:
        raise ModelLoadError(
            f"The tokenizer of {source!r} has neither a pad nor an eos token, so batches cannot be padded; "
            "add one (tokenizer.add_special_tokens({'pad_token': ...})) and save the tokenizer beside the model."
        )
    tokenizer.pad_token = tokenizer.eos_token


def configure_generation_stops(generation_config: GenerationConfig, tokenizer: PreTrainedTokenizerBase) -> None:
    """Stop on every end token the model or its chat template uses; pad with the tokenizer's pad token."""
    stop_ids = _as_list(generation_config.eos_token_id)
    for token_id in [tokenizer.eos_token_id, *_end_of_turn_ids(tokenizer)]:
        if token_id is not None and token_id not in stop_ids:
            stop_ids.append(token_id)
    if stop_ids:
        generation_config.eos_token_id = stop_ids[0] if len(stop_ids) == 1 else stop_ids
    if generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id


def _end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    template = tokenizer.chat_template
    if isinstance(template, dict):  # named templates ("default", "tool_use", ...)
        template = "\n".join(template.values())
    if not template:
        return []
    markers = [marker for marker in END_OF_TURN_MARKERS if marker in template]
    if not markers:
        return []
    vocab = tokenizer.get_vocab()
    return [vocab[marker] for marker in markers if marker in vocab]


def _as_list(token_ids: int | list[int] | None) -> list[int]:
    if token_ids is None:
        return []
    return [token_ids] if isinstance(token_ids, int) else list(token_ids)
