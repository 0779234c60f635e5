"""Model scores against their definitions, computed independently here from the model's logits:
IFD = s(A|Q) / s(A), EL2N = mean_t ||softmax - onehot||_2; batching and caching never change them;
a wrong answer scores worse than the right one under a model that has learnt the right ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from select_helpers import context_with, qa_pool, tiny_scorer
from tiny_models import tiny_chat_model_and_tokenizer

from tuneforge.data import encode_prompt
from tuneforge.select import Pool, plan_selection, run_selection
from tuneforge.select.scoring.cache import ScoreCache
from tuneforge.select.strategies.ifd import ifd_scores

PAIRS = [("Tom has 3 apples and buys 4 more. How many apples does Tom have now?", "7"),
         ("Hello there, how are you today?", "I am fine, thank you."),
         ("There are 3 boxes. The key is in box 1. Which box holds the key?", "box 1"),
         ("Move the key to box 2. Which box holds the key?", "The key is in box 2 now.")]


def reference_answer_stats(model, ids: list[int], answer_len: int) -> tuple[float, float]:
    """Mean NLL and mean ||softmax - onehot||_2 over the last answer_len tokens, from full logits."""
    with torch.no_grad():
        logits = model(torch.tensor([[int(t) for t in ids]])).logits[0].float()  # (T, V)
    predicting = logits[len(ids) - answer_len - 1: len(ids) - 1]
    targets = torch.tensor([int(t) for t in ids[len(ids) - answer_len:]])
    nll = F.cross_entropy(predicting, targets).item()
    error = predicting.softmax(-1) - F.one_hot(targets, predicting.shape[-1]).float()
    return nll, error.norm(dim=-1).mean().item()


def test_ifd_is_the_ratio_of_conditioned_to_direct_answer_loss(one_torch_thread):
    scorer = tiny_scorer()
    pool = qa_pool(PAIRS)
    expected = []
    for example in pool.examples:
        answer_ids = scorer.tokenizer(example.messages[-1].content, add_special_tokens=False)["input_ids"]
        prompt_ids = encode_prompt(example.prompt_messages, scorer.tokenizer, "chatml")
        with_q, _ = reference_answer_stats(scorer.model, prompt_ids + answer_ids, len(answer_ids))
        alone, _ = reference_answer_stats(scorer.model, [scorer.tokenizer.bos_token_id] + answer_ids, len(answer_ids))
        expected.append(with_q / alone)
    assert ifd_scores(pool, scorer) == pytest.approx(expected, rel=1e-4)


def test_el2n_and_loss_match_the_definition_and_do_not_depend_on_batching(one_torch_thread):
    pool = qa_pool(PAIRS)
    one_by_one, batched = tiny_scorer(batch_size=1), tiny_scorer(batch_size=4)
    sequences, _ = batched.example_sequences(pool.examples)
    scores = batched.answer_scores(sequences)
    assert scores == pytest.approx(one_by_one.answer_scores(sequences), rel=1e-4)  # padding and batch composition never change a score
    for (ids, answer_len), (nll, el2n) in zip(sequences, scores):
        assert (nll, el2n) == pytest.approx(reference_answer_stats(batched.model, ids, answer_len), rel=1e-4)


def test_scores_are_cached_per_model_and_data(tmp_path, one_torch_thread):
    pool = qa_pool(PAIRS)
    scorer = tiny_scorer(cache=ScoreCache(tmp_path))
    sequences, _ = scorer.example_sequences(pool.examples)
    first = scorer.answer_scores(sequences)
    again = scorer.answer_scores(sequences)
    assert scorer.cache.hits == 1 and np.array_equal(first, again)
    other_model = tiny_scorer(cache=ScoreCache(tmp_path), model_and_tokenizer=tiny_chat_model_and_tokenizer(seed=5))
    assert not np.allclose(other_model.answer_scores(sequences), first)  # another model's scores are not reused
    assert other_model.cache.hits == 0
    scorer.answer_scores(sequences[:2])  # other data: computed afresh
    assert scorer.cache.hits == 1


def memorised_scorer(pairs: list[tuple[str, str]], steps: int = 60):
    """A tiny model trained (all weights) until it has learnt ``pairs``: the right answers are likely to it."""
    model, tokenizer = tiny_chat_model_and_tokenizer()
    scorer = tiny_scorer(model_and_tokenizer=(model, tokenizer))
    sequences, _ = scorer.example_sequences(qa_pool(pairs).examples)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    model.train()
    for _ in range(steps):
        loss = 0.0
        for ids, answer_len in sequences:
            logits = model(torch.tensor([[int(t) for t in ids]])).logits[0]
            loss = loss + F.cross_entropy(logits[len(ids) - answer_len - 1: -1], torch.tensor([int(t) for t in ids[-answer_len:]]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return scorer


RIGHT = [("Tom has 3 apples and buys 4 more. How many?", "7"), ("Ann has 2 pens and finds 5 more. How many?", "7 pens"),
         ("Which box holds the key, box 1 or box 2?", "box 2"), ("Say hello.", "Hello there!")]
WRONG = ["12", "3 cats", "box 9", "Goodbye now."]


@pytest.fixture(scope="module")
def learnt():
    torch.set_num_threads(1)
    return memorised_scorer(RIGHT)


def test_perplexity_keeps_the_right_answers_and_drops_the_wrong_ones(learnt):
    pool = qa_pool(RIGHT + [(q, wrong) for (q, _), wrong in zip(RIGHT, WRONG)])
    result = run_selection(pool, plan_selection(pool, "perplexity", len(RIGHT)), context_with(learnt))
    assert result.selection.kept == list(range(len(RIGHT)))
    scores = result.selection.scores
    assert all(scores[i] < scores[i + len(RIGHT)] for i in range(len(RIGHT)))
    assert all(reason.startswith("dropped") for reason in result.selection.reasons[len(RIGHT):])


def test_grape_picks_the_candidate_the_model_finds_most_likely(learnt):
    # The right answer is second among the candidates, so picking the first would fail.
    pool = Pool(qa_pool(RIGHT).examples, candidates=[[wrong, right] for (_, right), wrong in zip(RIGHT, WRONG)])
    result = run_selection(pool, plan_selection(pool, "grape"), context_with(learnt))
    chosen = [e.messages[-1].content for e in result.selection.kept_examples(pool.examples)]
    assert chosen == [right for _, right in RIGHT]
    assert all("candidate 2 of 2 chosen" in reason for reason in result.selection.reasons)


def test_el2n_warm_up_runs_the_trainer_and_ranks_by_the_definition(one_torch_thread):
    pool = qa_pool(PAIRS * 2)
    scorer = tiny_scorer()
    base_before = {name: value.clone() for name, value in scorer.model.state_dict().items()}
    plan = plan_selection(pool, "el2n", 3, {"warmup_steps": 2, "warmup_batch_size": 2})
    result = run_selection(pool, plan, context_with(scorer))
    scores = result.selection.scores
    assert np.all((scores > 0) & (scores <= np.sqrt(2)))  # ||p - e_y||_2 lies in (0, sqrt 2]
    assert result.selection.kept == sorted(np.argsort(-scores, kind="stable")[:3].tolist())
    base_after = scorer.model.state_dict()
    assert base_after.keys() == base_before.keys(), "the warm-up must train a copy, never the base model itself"
    assert all(torch.equal(base_after[name], value) for name, value in base_before.items())
