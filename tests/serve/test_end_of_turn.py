"""A run's end-of-turn marker stops generation in serve, chat and eval, whatever the tokenizer.

The model here is built by hand so that its greedy continuation is known: every decoder block adds
nothing to the residual stream (zero output projections), so the next token is a function of the
current token alone, read from a table written into the LM head. After the assistant header it
writes "Hi", then the chatml marker `<|im_end|>`, then "\\n" and "Hi" again, forever. A reply must
therefore be exactly "Hi" with finish reason "stop"; without the marker as a stop it runs on.

Two tokenizers without a chat template (so the built-in chatml fallback renders prompts):
  * `split_marker_tokenizer`: `<|im_end|>` is five ordinary tokens (`<|`, `im`, `_`, `end`, `|>`),
    as chatml's marker is in Gemma's tokenizer: only a stop string can end the reply;
  * `build_tiny_tokenizer()`: `<|im_end|>` is one special token: it must be a stop id.
"""

from __future__ import annotations

import torch
from tiny_models import build_tiny_tokenizer, tiny_llama

from tuneforge.data import Example, Message
from tuneforge.eval.generation import PromptFormat, generate_answers
from tuneforge.serve.chat import ChatSession, ReplySettings
from tuneforge.serve.engine import Engine, GenerationRequest
from tuneforge.serve.sampling import SamplingParams

MARKER = "<|im_end|>"
MAX_TOKENS = 24


def split_marker_tokenizer():
    """Byte-level BPE with hand-written merges, so `<|im_end|>` splits into five distinct tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = [("<", "|"), ("i", "m"), ("e", "n"), ("en", "d"), ("|", ">")]
    vocab = {symbol: index for index, symbol in enumerate(alphabet + ["".join(pair) for pair in merges])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    tokenizer.add_special_tokens({"eos_token": "<eos>", "pad_token": "<pad>", "bos_token": "<bos>"})
    assert tokenizer.chat_template is None
    return tokenizer


def table_model(tokenizer, successor: dict[int, int]):
    """A tiny Llama whose greedy next token after token t is successor[t]."""
    model = tiny_llama(3, vocab_size=len(tokenizer), hidden_size=64, num_attention_heads=4)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embeddings = model.model.embed_tokens.weight  # (V, d)
        model.lm_head.weight.zero_()
        for current, following in successor.items():
            model.lm_head.weight[following] += 20 * embeddings[current] / embeddings[current].norm()
    return model.eval()


def looping_reply_model(tokenizer):
    """After the prompt's last token ("\\n" of the assistant header): Hi<|im_end|>\\nHi<|im_end|>..."""
    pieces = [tokenizer.convert_tokens_to_ids(t) for t in tokenizer.tokenize("\nHi")]
    marker = tokenizer(MARKER, add_special_tokens=False)["input_ids"]
    cycle = pieces + marker  # "\n", "H", "i", marker tokens..., then back to "\n"
    assert len(set(cycle)) == len(cycle), "each token of the loop needs one successor"
    return table_model(tokenizer, {token: cycle[(i + 1) % len(cycle)] for i, token in enumerate(cycle)})


def chat_prompt(tokenizer) -> list[int]:
    return PromptFormat.for_tokenizer("auto", tokenizer).encode([Message("user", "Hello")], tokenizer)


def test_the_table_model_writes_the_marker_and_runs_on_without_a_stop():
    """The oracle behind the other tests: ignoring stops, the reply is the loop, marker included."""
    tokenizer = split_marker_tokenizer()
    assert len(tokenizer(MARKER, add_special_tokens=False)["input_ids"]) == 5
    engine = Engine(looping_reply_model(tokenizer), tokenizer, max_batch_size=1)
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    [result] = engine.generate([GenerationRequest(tuple(chat_prompt(tokenizer)), params)])
    assert result.text.startswith(f"Hi{MARKER}\nHi{MARKER}")
    assert result.finish_reason == "length"


def test_engine_stops_on_a_marker_the_tokenizer_splits():
    tokenizer = split_marker_tokenizer()
    engine = Engine(looping_reply_model(tokenizer), tokenizer, max_batch_size=1)
    assert engine.end_of_turn.strings == (MARKER,) and not engine.end_of_turn.token_ids
    [result] = engine.generate([GenerationRequest(tuple(chat_prompt(tokenizer)), SamplingParams(max_tokens=MAX_TOKENS))])
    assert (result.text, result.finish_reason) == ("Hi", "stop")
    assert result.completion_tokens < MAX_TOKENS


def test_engine_stops_on_a_marker_that_is_one_token():
    tokenizer = build_tiny_tokenizer(chat_template=None)
    marker_id = tokenizer.convert_tokens_to_ids(MARKER)
    engine = Engine(looping_reply_model(tokenizer), tokenizer, max_batch_size=1)
    assert engine.end_of_turn.token_ids == (marker_id,) and marker_id in engine.stop_ids
    [result] = engine.generate([GenerationRequest(tuple(chat_prompt(tokenizer)), SamplingParams(max_tokens=MAX_TOKENS))])
    assert (result.text, result.finish_reason) == ("Hi", "stop")
    assert marker_id not in result.token_ids


def test_streamed_deltas_never_show_part_of_the_marker():
    tokenizer = split_marker_tokenizer()
    engine = Engine(looping_reply_model(tokenizer), tokenizer, max_batch_size=1)
    handle = engine.submit(GenerationRequest(tuple(chat_prompt(tokenizer)), SamplingParams(max_tokens=MAX_TOKENS)))
    engine.run_until_done(handle)
    assert "".join(delta.text for delta in handle.deltas(timeout=5)) == "Hi"


def test_terminal_chat_stops_on_the_marker():
    tokenizer = split_marker_tokenizer()
    session = ChatSession(looping_reply_model(tokenizer), tokenizer, PromptFormat.for_tokenizer("auto", tokenizer),
                          ReplySettings(max_new_tokens=MAX_TOKENS))
    reply = session.respond("Hello", on_text=lambda piece: None)
    assert reply.text == "Hi" and reply.generated_tokens < MAX_TOKENS


def test_eval_generation_stops_on_the_marker():
    tokenizer = split_marker_tokenizer()
    model = looping_reply_model(tokenizer)
    example = Example(messages=(Message("user", "Hello"), Message("assistant", "Hi")), answer="Hi")
    [answer] = generate_answers(model, tokenizer, [example], max_new_tokens=MAX_TOKENS, progress=False)
    assert answer == "Hi"


def test_chat_uses_the_template_the_run_trained_with(tmp_path):
    import yaml

    from tuneforge.eval.command import run_template

    adapter = tmp_path / "run" / "adapter"
    adapter.mkdir(parents=True)
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump({"data": {"template": "llama3"}}))
    assert run_template(str(adapter)) == "llama3"
    assert run_template(str(tmp_path / "run")) is None  # not a run's adapter folder
    (tmp_path / "run" / "config.yaml").write_text("data: [unclosed")
    assert run_template(str(adapter)) is None
    # llama3's marker is text to this tokenizer: a session in that format stops on the string.
    tokenizer = split_marker_tokenizer()
    assert PromptFormat.for_tokenizer("llama3", tokenizer).end_of_turn(tokenizer).strings == ("<|eot_id|>",)
