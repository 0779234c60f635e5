"""bench/train_throughput.py smoke: every setting of both sides, repeated, on a tiny saved model; the
generated long-answer task's shape."""

from __future__ import annotations

import json

from bench_scripts import load_bench_script
from tiny_models import save_tiny_chat_model, tiny_chat_model_and_tokenizer


def test_long_answer_task_answers_are_three_times_the_shared_opening():
    bench = load_bench_script("train_throughput")
    _, tokenizer = tiny_chat_model_and_tokenizer()
    from tuneforge.data import Example, tokenize_examples
    from tuneforge.data.records import Message

    examples = [Example(messages=tuple(Message(m["role"], m["content"]) for m in r["messages"]))
                for r in bench.long_answer_records(12)]
    tokenized = tokenize_examples(examples, tokenizer, max_seq_len=1024)
    opening = bench.shared_opening_tokens(tokenized)
    # Independently: the first position where two examples' ids differ bounds the shared opening.
    first, second = tokenized[0].input_ids, tokenized[1].input_ids
    differs = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
    assert 0 < opening <= differs
    assert tokenized[0].input_ids[:opening] == tokenized[-1].input_ids[:opening]
    assert all(sum(label != -100 for label in t.labels) >= 3 * opening for t in tokenized)
    assert bench.check_long_answers(tokenized)["answer_to_opening"] >= 3


def test_both_sides_run_each_setting_the_repeats_asked(tmp_path):
    bench = load_bench_script("train_throughput")
    save_tiny_chat_model(tmp_path / "tiny")
    rows = bench.main(["--models", str(tmp_path / "tiny"), "--tasks", "long-answer", "--steps", "2",
                       "--examples-per-step", "2", "--max-seq-len", "256", "--repeats", "2", "--threads", "1",
                       "--precisions", "fp32", "--peak-size", "256", "--workdir", str(tmp_path / "work"), "--output", str(tmp_path / "r.json")])
    assert [row["task"] for row in rows] == ["long-answer"]
    for row in rows:
        assert set(row["settings"]) == {"tuneforge/fp32", "tuneforge-fused/fp32", "peer/fp32"}
        assert all(s["repeats"] == 2 and s["steps"] == 2 and s["min"] <= s["tokens_per_second"] <= s["max"]
                   for s in row["settings"].values())
        assert row["speedup"] > 0 and row["memory_ratio"] > 0 and 0 < row["settings"]["peer/fp32"]["mfu"]
    saved = json.loads((tmp_path / "r.json").read_text())
    assert set(saved["machine"]["cpu_flags"]) == {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}
    assert saved["machine"]["peak_gflops"]["fp32"] > 0
