"""`tuneforge eval` on the user's own files: each record's final assistant turn is the gold answer and
the model is prompted with everything before it, rendered as training renders it (issue 15, part 4)."""

from __future__ import annotations

import argparse
import json

import pytest

from tuneforge.data import load_examples, tokenize_examples
from tuneforge.eval import command, generation
from tuneforge.eval.command import add_eval_arguments, run_eval

IGNORE = -100

# The same three conversations in each record format; the last has an earlier assistant turn,
# which must be part of the prompt and not the gold answer.
RECORDS = {
    "messages": [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]},
        {"messages": [{"role": "system", "content": "Count apples."},
                      {"role": "user", "content": "Tom has 3 apples and buys 4 more. How many apples does Tom have now?"},
                      {"role": "assistant", "content": "7"}]},
        {"messages": [{"role": "user", "content": "How are you today?"}, {"role": "assistant", "content": "I am fine"},
                      {"role": "user", "content": "Which box holds the key?"}, {"role": "assistant", "content": "box 2"}]},
    ],
    "sharegpt": [
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello there"}]},
        {"system": "Count apples.", "conversations": [
            {"from": "human", "value": "Tom has 3 apples and buys 4 more. How many apples does Tom have now?"},
            {"from": "gpt", "value": "7"}]},
        {"conversations": [{"from": "human", "value": "How are you today?"}, {"from": "gpt", "value": "I am fine"},
                           {"from": "human", "value": "Which box holds the key?"}, {"from": "gpt", "value": "box 2"}]},
    ],
    "alpaca": [
        {"instruction": "Hi", "input": "", "output": "Hello there"},
        {"instruction": "How many apples does Tom have now?", "input": "Tom has 3 apples and buys 4 more.", "output": "7"},
        {"instruction": "Which box holds the key?", "input": "", "output": "box 2"},
    ],
    "prompt_completion": [
        {"prompt": "Hi", "completion": "Hello there"},
        {"prompt": "Tom has 3 apples and buys 4 more. How many apples does Tom have now?", "completion": "7"},
        {"prompt": "Which box holds the key?", "completion": "box 2"},
    ],
}
FINAL_TURNS = ["Hello there", "7", "box 2"]


def _write(tmp_path, record_format):
    path = tmp_path / f"{record_format}.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in RECORDS[record_format]))
    return path


def _parse(*argv):
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    return parser.parse_args(list(argv))


def _answers_training_taught(tokenizer, path):
    """An oracle model: for a prompt, the tokens training labelled right after it in the record it
    starts, up to the end-of-turn token. It knows nothing of the evaluation code."""
    trained = tokenize_examples(load_examples(str(path)).examples, tokenizer)

    def generate_batch(model, id_lists, *, pad_id, stop_ids, max_new_tokens, stop_strings=(), tokenizer=None):
        replies = []
        for prompt in id_lists:
            [item] = [t for t in trained if t.input_ids[: len(prompt)] == list(prompt) and len(t.input_ids) > len(prompt)]
            reply = []
            for token, label in zip(item.input_ids[len(prompt):], item.labels[len(prompt):]):
                if label == IGNORE or token in tokenizer.all_special_ids:
                    break
                reply.append(token)
            replies.append(reply)
        return replies

    return generate_batch


@pytest.fixture
def patched_load(monkeypatch, fake_load_model):
    monkeypatch.setattr(command, "load_model", fake_load_model)
    return fake_load_model


@pytest.mark.parametrize("record_format", list(RECORDS))
def test_gold_answer_is_the_final_assistant_turn_of_each_format(tmp_path, record_format):
    from tuneforge.eval.generation import gold_answer

    examples = load_examples(str(_write(tmp_path, record_format))).examples
    assert [gold_answer(example) for example in examples] == FINAL_TURNS
    assert all(example.prompt_messages[-1].role == "user" for example in examples)


@pytest.mark.parametrize("record_format", list(RECORDS))
def test_a_model_answering_as_trained_scores_one_on_the_users_file(tmp_path, record_format, chat_tokenizer,
                                                                   patched_load, monkeypatch):
    path = _write(tmp_path, record_format)
    monkeypatch.setattr(generation, "generate_batch", _answers_training_taught(chat_tokenizer, path))
    output = tmp_path / "results.json"
    assert run_eval(_parse("--data", str(path), "--metrics", "exact_match,contains", "--output", str(output))) == 0
    [row] = json.loads(output.read_text())["results"]
    assert row["n"] == 3 and row["exact_match"] == 1.0 and row["contains"] == 1.0
    assert [sample["gold"] for sample in row["samples"]] == FINAL_TURNS


def test_a_model_giving_other_records_answers_scores_zero(tmp_path, chat_tokenizer, patched_load, monkeypatch):
    path = _write(tmp_path, "messages")
    oracle = _answers_training_taught(chat_tokenizer, path)

    def shifted(model, id_lists, **kwargs):  # each prompt gets the next record's answer
        replies = oracle(model, id_lists, **kwargs)
        return replies[1:] + replies[:1]

    monkeypatch.setattr(generation, "generate_batch", shifted)
    output = tmp_path / "results.json"
    assert run_eval(_parse("--data", str(path), "--metrics", "exact_match", "--batch-size", "3", "--output", str(output))) == 0
    assert json.loads(output.read_text())["results"][0]["exact_match"] == 0.0


def test_a_real_tiny_model_is_scored_on_a_chat_file_by_default(tmp_path, patched_load, capsys):
    path = _write(tmp_path, "alpaca")
    output = tmp_path / "results.json"
    assert run_eval(_parse("--data", str(path), "--max-new-tokens", "4", "--output", str(output))) == 0
    record = json.loads(output.read_text())
    assert record["metrics"] == ["loss", "exact_match", "contains"]
    [row] = record["results"]
    assert 0 <= row["exact_match"] <= row["contains"] <= 1 and row["loss"] > 0
    assert "exact match" in capsys.readouterr().out
