"""Chat templates render as specified; labels cover assistant replies and the stop token after each."""

from __future__ import annotations

import logging

import pytest

from tuneforge.data import IGNORE_INDEX, Example, Message, encode_prompt, render_conversation, render_prompt, tokenize_examples
from tuneforge.data.templates import ALPACA_PREAMBLE
from tuneforge.errors import ConfigError

CONVERSATION = (
    Message("system", "Be brief."),
    Message("user", "Hello there"),
    Message("assistant", "Hi, how are you?"),
    Message("user", "How many apples?"),
    Message("assistant", "7 apples"),
)
REPLIES = ["Hi, how are you?", "7 apples"]
CHAT = Example(messages=CONVERSATION)

EXPECTED_RENDERINGS = {
    "chatml": (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello there<|im_end|>\n"
        "<|im_start|>assistant\nHi, how are you?<|im_end|>\n<|im_start|>user\nHow many apples?<|im_end|>\n"
        "<|im_start|>assistant\n7 apples<|im_end|>"
    ),
    "llama3": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHello there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHi, how are you?<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHow many apples?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n7 apples<|eot_id|>"
    ),
    "alpaca": (
        "Be brief.\n\n### Instruction:\nHello there\n\n### Response:\nHi, how are you?<eos>\n\n"
        "### Instruction:\nHow many apples?\n\n### Response:\n7 apples<eos>"
    ),
    "plain": "Be brief.\nHello there\nHi, how are you?<eos>How many apples?\n7 apples<eos>",
}


def _with_llama3_tokens(tokenizer):
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    return tokenizer


def _labelled_runs(tokenized) -> list[list[int]]:
    """Maximal runs of consecutive labelled positions, as token ids."""
    runs, current = [], []
    for token, label in zip(tokenized.input_ids, tokenized.labels):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token  # labels are the inputs themselves (the model shifts)
            current.append(token)
    return runs + ([current] if current else [])


@pytest.mark.parametrize("template", sorted(EXPECTED_RENDERINGS))
def test_builtin_template_renders_exactly(template, make_tiny_tokenizer):
    tokenizer = make_tiny_tokenizer()
    if template == "llama3":
        tokenizer = _with_llama3_tokens(tokenizer)
    rendered = render_conversation(CONVERSATION, tokenizer, template)
    assert rendered.text == EXPECTED_RENDERINGS[template]
    closing = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "alpaca": "<eos>", "plain": "<eos>"}[template]
    assert [rendered.text[start:end] for start, end in rendered.trained_spans] == [reply + closing for reply in REPLIES]


def test_alpaca_adds_its_preamble_when_there_is_no_system_message(tiny_tokenizer):
    rendered = render_conversation(CONVERSATION[1:3], tiny_tokenizer, "alpaca")
    assert rendered.text == f"{ALPACA_PREAMBLE}\n\n### Instruction:\nHello there\n\n### Response:\nHi, how are you?<eos>"


def test_llama3_without_its_special_tokens_still_ends_each_reply_with_eos(tiny_tokenizer):
    # The tiny tokenizer has no <|eot_id|> token: the turn marker is then ordinary text, so EOS is
    # added after it and trained, or the model would never learn to stop.
    rendered = render_conversation(CONVERSATION, tiny_tokenizer, "llama3")
    assert [rendered.text[start:end] for start, end in rendered.trained_spans] == [reply + "<|eot_id|><eos>" for reply in REPLIES]


@pytest.mark.parametrize("template", ["auto", "chatml", "llama3", "alpaca", "plain"])
def test_only_replies_and_their_stop_token_are_labelled(template, make_tiny_tokenizer, tiny_chat_tokenizer):
    tokenizer = tiny_chat_tokenizer if template == "auto" else make_tiny_tokenizer()
    (tokenized,) = tokenize_examples([CHAT], tokenizer, template=template)
    runs = _labelled_runs(tokenized)
    assert len(runs) == len(REPLIES)
    stop_ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    for run, reply in zip(runs, REPLIES):
        # The token right after each answer is the stop token, and it is trained.
        assert run[-1] in stop_ids
        assert tokenizer.decode(run[:-1]).removesuffix("<|eot_id|>") == reply
    # The stop token is the very next token of the input after the reply, not somewhere later.
    labelled_positions = [i for i, label in enumerate(tokenized.labels) if label != IGNORE_INDEX]
    for position in labelled_positions:
        if tokenized.labels[position] in stop_ids:
            assert position - 1 in labelled_positions


def test_smollm2_template_masks_and_ends_every_reply_with_its_eos(smollm2_tokenizer):
    tokenizer = smollm2_tokenizer
    (tokenized,) = tokenize_examples([CHAT], tokenizer, template="auto")
    # Training sees exactly what the model's own template gives.
    expected_ids = tokenizer(tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in CONVERSATION], tokenize=False), add_special_tokens=False)["input_ids"]
    assert tokenized.input_ids == list(expected_ids)
    runs = _labelled_runs(tokenized)
    assert [tokenizer.decode(run[:-1]) for run in runs] == REPLIES
    assert [run[-1] for run in runs] == [tokenizer.eos_token_id] * 2
    assert tokenizer.convert_ids_to_tokens(tokenizer.eos_token_id) == "<|im_end|>"


def test_smollm2_default_system_prompt_is_not_trained(smollm2_tokenizer):
    (tokenized,) = tokenize_examples([Example(messages=CONVERSATION[1:3])], smollm2_tokenizer)
    assert "SmolLM" in smollm2_tokenizer.decode(tokenized.input_ids)
    assert [smollm2_tokenizer.decode(run) for run in _labelled_runs(tokenized)] == [REPLIES[0] + "<|im_end|>"]


def test_tokenizer_template_without_end_marker_gets_eos_after_each_reply(make_tiny_tokenizer):
    tokenizer = make_tiny_tokenizer(chat_template="{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    (tokenized,) = tokenize_examples([CHAT], tokenizer)
    text = tokenizer.decode(tokenized.input_ids)
    assert "assistant: Hi, how are you?<eos>\nuser: How many apples?" in text
    # lstrip: byte-level BPE merges the space after "assistant:" into the reply's first token
    # (" 7"), and that token is rightly trained: it is the one the model must produce.
    assert [tokenizer.decode(run).lstrip() for run in _labelled_runs(tokenized)] == [reply + "<eos>" for reply in REPLIES]


def test_template_that_renders_the_last_turn_differently_falls_back_to_search(make_tiny_tokenizer):
    # Not prefix-stable: the last message ends with "<|im_end|>", others with a newline.
    template = "{% for m in messages %}{{ m.role }}: {{ m.content }}{% if loop.last %}<|im_end|>{% else %}\n{% endif %}{% endfor %}"
    tokenizer = make_tiny_tokenizer(chat_template=template)
    (tokenized,) = tokenize_examples([CHAT], tokenizer)
    assert [tokenizer.decode(run).lstrip() for run in _labelled_runs(tokenized)] == [REPLIES[0] + "<eos>", REPLIES[1] + "<|im_end|>"]


def test_train_on_all_labels_every_token(tiny_chat_tokenizer):
    (tokenized,) = tokenize_examples([CHAT], tiny_chat_tokenizer, train_on="all")
    assert tokenized.labels == tokenized.input_ids


def test_text_examples_train_every_token_and_end_with_eos(make_tiny_tokenizer):
    tokenizer = make_tiny_tokenizer(adds_bos=True)
    (tokenized,) = tokenize_examples([Example(text="Tom has 3 apples.")], tokenizer)
    body = tokenizer("Tom has 3 apples.", add_special_tokens=False)["input_ids"]
    assert tokenized.input_ids == [tokenizer.bos_token_id, *body, tokenizer.eos_token_id]
    assert tokenized.labels == tokenized.input_ids


def test_builtin_templates_get_the_tokenizers_bos(make_tiny_tokenizer):
    tokenizer = make_tiny_tokenizer(adds_bos=True)
    (chatml,) = tokenize_examples([CHAT], tokenizer, template="chatml")
    assert chatml.input_ids[0] == tokenizer.bos_token_id and chatml.labels[0] == IGNORE_INDEX
    (llama3,) = tokenize_examples([CHAT], _with_llama3_tokens(tokenizer), template="llama3")
    assert llama3.input_ids[0] == tokenizer.convert_tokens_to_ids("<|begin_of_text|>")  # written by the template, not doubled


@pytest.mark.parametrize("template", ["auto", "chatml", "llama3", "alpaca", "plain"])
def test_generation_prompt_is_a_prefix_of_the_training_sequence(template, make_tiny_tokenizer, tiny_chat_tokenizer):
    tokenizer = tiny_chat_tokenizer if template == "auto" else make_tiny_tokenizer()
    (tokenized,) = tokenize_examples([CHAT], tokenizer, template=template)
    prompt = render_prompt(CONVERSATION[:-1], tokenizer, template)
    prompt_ids = encode_prompt(CONVERSATION[:-1], tokenizer, template)
    assert tokenizer.decode(prompt_ids).endswith(prompt)
    assert tokenized.input_ids[: len(prompt_ids)] == prompt_ids
    # What training adds after the prompt is exactly the trained reply.
    assert tokenized.labels[len(prompt_ids) - 1] == IGNORE_INDEX
    assert tokenizer.decode(tokenized.input_ids[len(prompt_ids):]).startswith("7 apples")


def test_generation_prompt_with_bos_and_smollm2(make_tiny_tokenizer, smollm2_tokenizer):
    tokenizer = make_tiny_tokenizer(adds_bos=True)
    (tokenized,) = tokenize_examples([CHAT], tokenizer, template="chatml")
    prompt_ids = encode_prompt(CONVERSATION[:-1], tokenizer, "chatml")
    assert prompt_ids[0] == tokenizer.bos_token_id and tokenized.input_ids[: len(prompt_ids)] == prompt_ids
    (tokenized,) = tokenize_examples([CHAT], smollm2_tokenizer)
    prompt_ids = encode_prompt(CONVERSATION[:-1], smollm2_tokenizer)
    assert tokenized.input_ids[: len(prompt_ids)] == prompt_ids
    assert smollm2_tokenizer.decode(prompt_ids).endswith("<|im_start|>assistant\n")


def test_auto_without_a_chat_template_falls_back_to_chatml_with_one_warning(tiny_tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="tuneforge.data"):
        auto = tokenize_examples([CHAT, CHAT], tiny_tokenizer, template="auto")
    chatml = tokenize_examples([CHAT], tiny_tokenizer, template="chatml")
    assert auto[0].input_ids == chatml[0].input_ids
    assert sum("no chat template" in r.getMessage() for r in caplog.records) == 1


def test_truncation_keeps_the_start_by_default_and_the_end_on_request(tiny_tokenizer):
    (full,) = tokenize_examples([CHAT], tiny_tokenizer, template="chatml")
    limit = len(full) - 5
    (right,) = tokenize_examples([CHAT], tiny_tokenizer, template="chatml", max_seq_len=limit)
    (left,) = tokenize_examples([CHAT], tiny_tokenizer, template="chatml", max_seq_len=limit, truncation_side="left")
    assert right.input_ids == full.input_ids[:limit] and right.labels == full.labels[:limit]
    assert left.input_ids == full.input_ids[-limit:] and left.labels == full.labels[-limit:]


def test_examples_with_nothing_left_to_train_are_dropped_with_a_warning(tiny_tokenizer, caplog):
    long_prompt = Example(messages=(Message("user", "Hello there " * 50), Message("assistant", "Hi")))
    (full,) = tokenize_examples([CHAT], tiny_tokenizer, template="chatml")
    with caplog.at_level(logging.WARNING, logger="tuneforge.data"):
        kept = tokenize_examples([long_prompt, CHAT], tiny_tokenizer, template="chatml", max_seq_len=len(full) - 2)
    assert len(kept) == 1 and kept[0].input_ids == full.input_ids[:-2]
    assert any("Dropped 1 example(s)" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"template": "vicuna"}, "Unknown chat template 'vicuna'"),
        ({"train_on": "user"}, "train_on='user' is not one of"),
        ({"truncation_side": "middle"}, "truncation_side='middle'"),
        ({"max_seq_len": 0}, "max_seq_len=0"),
    ],
)
def test_bad_options_are_config_errors(options, message, tiny_tokenizer):
    with pytest.raises(ConfigError, match=message):
        tokenize_examples([CHAT], tiny_tokenizer, **options)
