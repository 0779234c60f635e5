"""Preference and KTO records: shapes, the implicit prompt, bad records, bundled pairs, batches."""

from __future__ import annotations

import json
import re

import pytest

from tuneforge.data.preference import (
    KtoExample,
    PreferencePair,
    PreferencePlan,
    load_preference_records,
    split_implicit_prompt,
    tokenize_records,
)
from tuneforge.data.records import Message
from tuneforge.data.tokenization import IGNORE_INDEX
from tuneforge.errors import DataError


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_strings_and_message_lists_give_the_same_pair(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
        {"prompt": [{"role": "user", "content": "2+2?"}], "chosen": [{"role": "assistant", "content": "4"}],
         "rejected": [{"role": "assistant", "content": "5"}]},
    ])
    (first, second), skipped = load_preference_records(str(path), "dpo")
    assert skipped == 0
    assert (first.prompt, first.chosen, first.rejected) == (second.prompt, second.chosen, second.rejected)
    assert first.prompt == (Message("user", "2+2?"),) and first.chosen == (Message("assistant", "4"),)


def test_an_implicit_prompt_inside_message_lists_is_detected(tmp_path):
    opening = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    path = write_jsonl(tmp_path / "p.jsonl", [{"chosen": opening + [{"role": "assistant", "content": "4"}],
                                               "rejected": opening + [{"role": "assistant", "content": "five"}]}])
    (pair,), _ = load_preference_records(str(path), "dpo")
    assert pair.prompt == (Message("system", "Be brief."), Message("user", "2+2?"))
    assert pair.chosen == (Message("assistant", "4"),) and pair.rejected == (Message("assistant", "five"),)


def test_an_implicit_prompt_inside_strings_is_cut_at_a_word_boundary():
    prompt, chosen, rejected = split_implicit_prompt((Message("assistant", "Q: how many? A: four"),),
                                                     (Message("assistant", "Q: how many? A: five"),))
    assert prompt == (Message("user", "Q: how many? A:"),)
    assert chosen == (Message("assistant", "four"),) and rejected == (Message("assistant", "five"),)


@pytest.mark.parametrize(("record", "problem"), [
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "identical"),
    ({"prompt": "q", "chosen": "", "rejected": "no"}, "empty completion"),
    ({"prompt": "q", "chosen": "yes"}, "missing the field 'rejected'"),
    ({"prompt": "q", "chosen": 3, "rejected": "no"}, "'chosen' must be a string or a list"),
    ({"chosen": "apple", "rejected": "banana"}, "add a 'prompt' field"),
])
def test_bad_pairs_name_file_line_and_problem(tmp_path, record, problem):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}, record])
    with pytest.raises(DataError) as error:
        load_preference_records(str(path), "dpo")
    message = str(error.value)
    assert f"{path}:2" in message and problem in message and "on_bad_record='skip'" in message


def test_bad_records_can_be_skipped_and_counted(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"},
                                              {"prompt": "q", "chosen": "a", "rejected": "a"}])
    records, skipped = load_preference_records(str(path), "dpo", on_bad_record="skip")
    assert len(records) == 1 and skipped == 1


def test_kto_records_need_a_boolean_label(tmp_path):
    path = write_jsonl(tmp_path / "k.jsonl", [{"prompt": "q", "completion": "a", "label": True},
                                              {"prompt": "q", "completion": "b", "label": "yes"}])
    with pytest.raises(DataError, match=r"k.jsonl:2: field 'label' must be true"):
        load_preference_records(str(path), "kto")
    records, skipped = load_preference_records(str(path), "kto", on_bad_record="skip")
    assert records[0].desirable is True and skipped == 1


def test_bundled_task_gives_right_chosen_and_wrong_or_verbose_rejected_answers():
    pairs, _ = load_preference_records("arithmetic", "dpo", size=20)
    again, _ = load_preference_records("arithmetic", "dpo", size=20)
    assert pairs == again  # deterministic
    kinds = set()
    for pair in pairs:
        chosen, rejected = pair.chosen[0].content, pair.rejected[0].content
        assert chosen.isdigit() and rejected != chosen
        if rejected.isdigit():  # wrong
            kinds.add("wrong")
        else:  # verbose: the right number inside a sentence
            assert re.findall(r"\d+", rejected) == [chosen] and len(rejected.split()) > 3
            kinds.add("verbose")
    assert kinds == {"wrong", "verbose"}
    kto, _ = load_preference_records("arithmetic", "kto", size=20)
    assert [k.desirable for k in kto[:4]] == [True, False, True, False]


def test_a_prompt_longer_than_max_seq_len_is_a_bad_record(tiny_chat_tokenizer):
    pairs = [PreferencePair((Message("user", "apples " * 200),), (Message("assistant", "4"),), (Message("assistant", "5"),)),
             PreferencePair((Message("user", "hi"),), (Message("assistant", "4"),), (Message("assistant", "5"),))]
    with pytest.raises(DataError, match="raise data.max_seq_len"):
        tokenize_records(pairs, tiny_chat_tokenizer, "auto", 64, "error", "pairs.jsonl")
    items, skipped = tokenize_records(pairs, tiny_chat_tokenizer, "auto", 64, "skip", "pairs.jsonl")
    assert len(items) == 1 and skipped == 1


def test_pair_batches_put_chosen_rows_before_rejected_rows(tiny_chat_tokenizer):
    pairs = [PreferencePair((Message("user", f"q{i}"),), (Message("assistant", "yes"),), (Message("assistant", "no no"),))
             for i in range(3)]
    items, _ = tokenize_records(pairs, tiny_chat_tokenizer, "auto", 64, "error", "x")
    plan = PreferencePlan(items, batch_size=2, seed=0, pad_id=0)
    batches = plan.batches(0)
    batch = batches[0]
    units = batches.units[0]
    assert batch["input_ids"].shape[0] == 4
    assert batch["example_ids"].tolist() == [2 * units[0], 2 * units[1], 2 * units[0] + 1, 2 * units[1] + 1]
    chosen_row = batch["input_ids"][0][batch["labels"][0] != IGNORE_INDEX].tolist()
    assert tiny_chat_tokenizer.decode(chosen_row).startswith("yes")
    assert sorted(u for units in plan.batches(1).units for u in units) == [0, 1, 2]  # every pair once per epoch


def test_kto_batches_carry_mismatched_pairs_for_the_kl_estimate(tiny_chat_tokenizer):
    examples = [KtoExample((Message("user", f"question {i}"),), (Message("assistant", "a" * (i + 1)),), i % 2 == 0)
                for i in range(3)]
    items, _ = tokenize_records(examples, tiny_chat_tokenizer, "auto", 64, "error", "x")
    batch = PreferencePlan(items, batch_size=3, seed=0, pad_id=0, shuffle=False).collate([0, 1, 2])
    assert batch["kto_labels"].tolist() == [1, 0, 1]

    def completion(ids, labels):
        return tiny_chat_tokenizer.decode(ids[labels != IGNORE_INDEX].tolist())

    def prompt(ids, labels):
        first = int((labels != IGNORE_INDEX).nonzero()[0])
        return tiny_chat_tokenizer.decode(ids[:first].tolist())

    for row in range(3):  # row i: prompt i with completion i-1 (cycled)
        assert completion(batch["kl_input_ids"][row], batch["kl_labels"][row]) == completion(batch["input_ids"][row - 1], batch["labels"][row - 1])
        assert prompt(batch["kl_input_ids"][row], batch["kl_labels"][row]) == prompt(batch["input_ids"][row], batch["labels"][row])


def test_a_pair_whose_difference_lies_beyond_max_seq_len_is_a_bad_record(tiny_chat_tokenizer):
    """Cut to max_seq_len, chosen and rejected become the same tokens: no preference is left."""
    long = "apples " * 100
    pairs = [PreferencePair((Message("user", "q"),), (Message("assistant", long + "4"),), (Message("assistant", long + "5"),)),
             PreferencePair((Message("user", "q"),), (Message("assistant", "4"),), (Message("assistant", "5"),))]
    with pytest.raises(DataError, match=r"same \d+ tokens once cut to data.max_seq_len=64"):
        tokenize_records(pairs, tiny_chat_tokenizer, "auto", 64, "error", "pairs.jsonl")
    items, skipped = tokenize_records(pairs, tiny_chat_tokenizer, "auto", 64, "skip", "pairs.jsonl")
    assert len(items) == 1 and skipped == 1


@pytest.mark.parametrize("completion", ["", "   ", [{"role": "assistant", "content": " "}], []])
def test_empty_kto_completions_are_bad_records(tmp_path, completion):
    path = write_jsonl(tmp_path / "k.jsonl", [{"prompt": "q", "completion": "a", "label": True},
                                              {"prompt": "q", "completion": completion, "label": False}])
    with pytest.raises(DataError, match=r"k.jsonl:2: .*(empty completion|end with an assistant turn)"):
        load_preference_records(str(path), "kto")
    records, skipped = load_preference_records(str(path), "kto", on_bad_record="skip")
    assert len(records) == 1 and skipped == 1
