"""`tuneforge chat` driven through piped stdin: streamed answers (from the serving engine) equal
transformers' greedy generation."""

from __future__ import annotations

import argparse
import io
import sys

import pytest
from eval_helpers import make_model, save_perturbed_adapter

from tuneforge.adapters import load_adapter
from tuneforge.data import Example, Message
from tuneforge.errors import ConfigError
from tuneforge.eval import generate_answers
from tuneforge.eval.generation import PromptFormat
from tuneforge.serve import chat
from tuneforge.serve.chat import ChatSession, ReplySettings, add_chat_arguments, run_chat

NEW_TOKENS = 8


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tuneforge chat")
    add_chat_arguments(parser)
    return parser.parse_args(list(argv))


def _greedy_reply(tokenizer, turns: list[tuple[str, str]]) -> str:
    """What generate_answers says after the conversation `turns` (the last one a user turn)."""
    messages = tuple(Message(role, content) for role, content in turns) + (Message("assistant", "?"),)
    return generate_answers(make_model(tokenizer), tokenizer, [Example(messages=messages, answer="?")],
                            max_new_tokens=NEW_TOKENS, progress=False)[0]


def test_piped_chat_answers_each_line_resets_and_exits_at_eof(monkeypatch, capsys, chat_tokenizer, fake_load_model):
    monkeypatch.setattr(chat, "load_model", fake_load_model)
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is 2+3?\nAnd plus 4?\n/reset\nAnd plus 4?\n"))

    assert run_chat(_parse("--max-new-tokens", str(NEW_TOKENS), "--system", "Be brief.")) == 0

    out = capsys.readouterr().out
    first = _greedy_reply(chat_tokenizer, [("system", "Be brief."), ("user", "What is 2+3?")])
    follow_up = _greedy_reply(chat_tokenizer, [("system", "Be brief."), ("user", "What is 2+3?"), ("assistant", first),
                                               ("user", "And plus 4?")])
    fresh = _greedy_reply(chat_tokenizer, [("system", "Be brief."), ("user", "And plus 4?")])
    assert first and follow_up != fresh, "history must change the answer for this test to bite"
    assert [line.strip() for line in out.splitlines()] == [first, follow_up, fresh]


def test_piped_chat_with_an_adapter_answers_as_the_adapted_model(monkeypatch, capsys, tmp_path, chat_tokenizer, fake_load_model):
    run = tmp_path / "run"
    save_perturbed_adapter(chat_tokenizer, run / "adapter", seed=7, target_modules=["q_proj", "v_proj"])
    monkeypatch.setattr(chat, "load_model", fake_load_model)
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is 2+3?\n"))

    assert run_chat(_parse("--adapter", str(run), "--max-new-tokens", str(NEW_TOKENS))) == 0

    adapted = make_model(chat_tokenizer)
    load_adapter(adapted, run / "adapter")
    example = Example(messages=(Message("user", "What is 2+3?"), Message("assistant", "?")), answer="?")
    [expected] = generate_answers(adapted, chat_tokenizer, [example], max_new_tokens=NEW_TOKENS, progress=False)
    assert expected != _greedy_reply(chat_tokenizer, [("user", "What is 2+3?")]), "the adapter must change the reply"
    assert capsys.readouterr().out.strip() == expected


def test_a_missing_adapter_fails_before_the_model_loads(monkeypatch, fake_load_model, tmp_path):
    monkeypatch.setattr(chat, "load_model", fake_load_model)
    with pytest.raises(ConfigError, match="does not exist"):
        run_chat(_parse("--adapter", str(tmp_path / "nothing")))
    assert fake_load_model.calls == []


def test_quantize_loads_the_base_quantized_for_the_chat(monkeypatch, fake_load_model):
    from tuneforge.quant import QuantLinear

    monkeypatch.setattr(chat, "load_model", fake_load_model)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    sessions = []
    monkeypatch.setattr(chat, "chat_loop", lambda session, interactive: sessions.append(session) or 0)
    assert run_chat(_parse("--quantize", "int8", "--device", "cpu")) == 0
    assert fake_load_model.quantized["bits"] == 8
    assert any(isinstance(module, QuantLinear) for module in sessions[0].model.modules())


def test_a_bad_quantize_value_is_argparses_error(fake_load_model, monkeypatch, capsys):
    from tuneforge.cli import main

    monkeypatch.setattr(chat, "load_model", fake_load_model)
    with pytest.raises(SystemExit) as exit_info:
        main(["chat", "--quantize", "q4"])
    assert exit_info.value.code == 2 and fake_load_model.calls == []
    assert "argument --quantize: invalid choice: 'q4'" in capsys.readouterr().err


def test_slash_exit_ends_the_session(monkeypatch, capsys, fake_load_model):
    monkeypatch.setattr(chat, "load_model", fake_load_model)
    monkeypatch.setattr(sys, "stdin", io.StringIO("/exit\nnever answered\n"))
    assert run_chat(_parse()) == 0
    assert capsys.readouterr().out == ""


def test_ctrl_c_stops_one_answer_but_not_the_session(chat_model, chat_tokenizer):
    def new_session():
        return ChatSession(chat_model, chat_tokenizer, PromptFormat.for_tokenizer("auto", chat_tokenizer),
                           ReplySettings(max_new_tokens=64))

    question = "Tom has 3 apples and buys 4 more."
    full = new_session().respond(question, on_text=lambda text: None)
    pieces = []

    def press_ctrl_c(text):
        pieces.append(text)
        raise KeyboardInterrupt

    session = new_session()
    stopped = session.respond(question, on_text=press_ctrl_c)
    assert stopped.interrupted and not full.interrupted
    assert stopped.text == pieces[0].strip() and full.text.startswith(stopped.text)
    assert stopped.generated_tokens < full.generated_tokens, "generation itself must stop, not only the printing"
    assert [message.role for message in session.history] == ["user", "assistant"]

    after = session.respond("How many apples does Tom have now?", on_text=lambda text: None)
    assert not after.interrupted and len(session.history) == 4


@pytest.mark.parametrize("settings", [dict(max_new_tokens=0), dict(temperature=-0.5)])
def test_bad_reply_settings(settings):
    with pytest.raises(ConfigError):
        ReplySettings(**settings)


def test_sampling_with_temperature_runs(chat_model, chat_tokenizer):
    session = ChatSession(chat_model, chat_tokenizer, PromptFormat.for_tokenizer("auto", chat_tokenizer),
                          ReplySettings(max_new_tokens=4, temperature=0.8))
    assert not session.respond("Hi", on_text=lambda text: None).interrupted
