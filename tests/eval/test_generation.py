"""Batched greedy generation: left padding must not change any row's output."""

from __future__ import annotations

import torch
from eval_helpers import QUESTIONS, make_model, qa_example
from tiny_models import build_tiny_tokenizer

from tuneforge.data import tokenize_examples
from tuneforge.eval import generate_answers
from tuneforge.eval.generation import PromptFormat, generate_batch, left_pad, padding_id, stop_token_ids, until_stop

NEW_TOKENS = 10


def _prompt_ids(tokenizer, examples):
    prompt_format = PromptFormat.for_tokenizer("auto", tokenizer)
    return [prompt_format.encode(example.prompt_messages, tokenizer) for example in examples]


def test_batched_equals_single_token_for_token(chat_model, chat_tokenizer, qa_examples):
    prompts = _prompt_ids(chat_tokenizer, qa_examples)
    assert len({len(ids) for ids in prompts}) == len(prompts), "prompts of different lengths, so rows get padded"
    stops = stop_token_ids(chat_model, chat_tokenizer)
    pad = padding_id(chat_model, chat_tokenizer, stops)

    batched = generate_batch(chat_model, prompts, pad_id=pad, stop_ids=stops, max_new_tokens=NEW_TOKENS)
    single = [generate_batch(chat_model, [ids], pad_id=pad, stop_ids=stops, max_new_tokens=NEW_TOKENS)[0] for ids in prompts]

    assert batched == single
    assert len({tuple(ids) for ids in single}) > 1, "the model must answer prompts differently for this test to bite"


def test_generate_answers_batch_size_does_not_change_answers(chat_model, chat_tokenizer, qa_examples):
    side = chat_tokenizer.padding_side
    together = generate_answers(chat_model, chat_tokenizer, qa_examples, max_new_tokens=NEW_TOKENS, batch_size=5, progress=False)
    one_by_one = generate_answers(chat_model, chat_tokenizer, qa_examples, max_new_tokens=NEW_TOKENS, batch_size=1, progress=False)
    assert together == one_by_one
    assert all(answer == answer.strip() for answer in together)
    assert chat_tokenizer.padding_side == side  # the shared tokenizer is left as it was


def test_generate_answers_restores_training_mode(chat_model, chat_tokenizer):
    chat_model.train()
    generate_answers(chat_model, chat_tokenizer, [qa_example("Hi")], max_new_tokens=2, progress=False)
    assert chat_model.training


def test_left_pad_right_aligns_rows():
    input_ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert input_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_until_stop_cuts_at_the_first_stop_id():
    assert until_stop([4, 5, 1, 6, 0, 0], stop_ids=[1, 9]) == [4, 5]
    assert until_stop([4, 5], stop_ids=[1]) == [4, 5]


def test_prompt_ids_are_the_start_of_the_training_ids(chat_tokenizer):
    """Evaluation must feed exactly the tokens training put before the answer, BOS included or not."""
    bos_tokenizer = build_tiny_tokenizer(adds_bos=True)  # no chat template: the built-in chatml is used
    for tokenizer, template in [(chat_tokenizer, "auto"), (bos_tokenizer, "chatml"), (bos_tokenizer, "alpaca")]:
        example = qa_example(QUESTIONS[1], "7")
        prompt = PromptFormat.for_tokenizer(template, tokenizer).encode(example.prompt_messages, tokenizer)
        trained = tokenize_examples([example], tokenizer, template=template)[0]
        assert trained.input_ids[: len(prompt)] == prompt, (template, tokenizer.chat_template is not None)
        first_answer_token = next(i for i, label in enumerate(trained.labels) if label != -100)
        assert first_answer_token == len(prompt)


def test_stop_ids_include_generation_config_and_tokenizer_eos(chat_tokenizer):
    model = make_model(chat_tokenizer)
    im_end = chat_tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.eos_token_id = [im_end]
    assert stop_token_ids(model, chat_tokenizer) == [im_end, chat_tokenizer.eos_token_id]


def test_generation_stops_at_an_end_of_turn_token(chat_tokenizer):
    """Force the model to emit <|im_end|> after two tokens: the answer must end there."""
    model = make_model(chat_tokenizer)
    im_end = chat_tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.eos_token_id = [im_end]
    token_a, token_b = chat_tokenizer.convert_tokens_to_ids(["T", "om"])
    script = iter([token_a, token_b, im_end])
    original_forward = model.forward

    def scripted_forward(*args, **kwargs):
        output = original_forward(*args, **kwargs)
        forced = torch.full_like(output.logits[:, -1], -1e9)
        forced[:, next(script)] = 0.0
        output.logits[:, -1] = forced
        return output

    model.forward = scripted_forward
    answers = generate_answers(model, chat_tokenizer, [qa_example("Hi")], max_new_tokens=8, progress=False)
    assert answers == ["Tom"]
