"""DeepSeek-V3.2's chat format, written natively.

DeepSeek-V3.2 ships no Jinja template: its repo renders conversations with a Python file
(`encoding/encoding_dsv32.py`), which llmcli never runs (code from a model repo is never executed). This
module writes the same text for the same messages:

  <BOS>{system}[tools][response format]
  <｜User｜>{user}<｜Assistant｜></think>{reply}<EOS>              chat mode
  <｜User｜>{user}<｜Assistant｜><think>                           thinking mode, the last user turn
  ...{reasoning}</think>{reply}<EOS>                               a reply after the last user turn

Earlier turns always end their user message with </think>; in thinking mode, replies before the last
user turn lose their reasoning. Tool calls are written in DSML (`<｜DSML｜function_calls>` blocks) and
tool results follow as `<function_results>`. The generation prompt is part of the user turn itself.
"""

from __future__ import annotations

import json
from typing import Any

from llmcli.errors import LlmcliError

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
THINK, END_THINK = "<think>", "</think>"
DSML = "｜DSML｜"
NAME = "DeepSeek-V3.2 chat format (built in)"

TOOLS_PREAMBLE = f"""## Tools
You have access to a set of tools you can use to answer the user's question.
You can invoke functions by writing a "<{DSML}function_calls>" block like the following as part of your reply to the user:
<{DSML}function_calls>
<{DSML}invoke name="$FUNCTION_NAME">
<{DSML}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{DSML}parameter>
...
</{DSML}invoke>
<{DSML}invoke name="$FUNCTION_NAME2">
...
</{DSML}invoke>
</{DSML}function_calls>
String and scalar parameters should be specified as is without any escaping or quotes, while lists and objects should use JSON format. The "string" attribute should be set to "true" for string type parameters and "false" for other types (numbers, booleans, arrays, objects).
If the thinking_mode is enabled, then after function results you should strongly consider outputting a thinking block. Here is an example:
<{DSML}function_calls>
...
</{DSML}function_calls>
<function_results>
...
</function_results>
{THINK}...thinking about results{END_THINK}
Here are the functions available in JSONSchema format:
<functions>
"""  # noqa: E501  (the model was trained on these exact lines)
RESPONSE_FORMAT = "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"


def _json(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except UnicodeEncodeError:  # lone surrogates
        return json.dumps(value, ensure_ascii=True)


def _tools_block(tools: list[dict]) -> str:
    """OpenAI-style tools ({"type": "function", "function": {...}}) as the model's tool preamble."""
    schemas = "\n".join(_json(tool["function"] if "function" in tool else tool) for tool in tools)
    return TOOLS_PREAMBLE + schemas + "\n</functions>\n"


def _extras(message: dict) -> str:
    """A system or developer message's tools and response format, each after a blank line."""
    text = ""
    if message.get("tools"):
        text += "\n\n" + _tools_block(message["tools"])
    if message.get("response_format"):
        text += "\n\n" + RESPONSE_FORMAT + _json(message["response_format"])
    return text


def _tool_call(call: dict) -> str:
    function = call.get("function", call)
    arguments = function.get("arguments") or {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError as exc:
            raise LlmcliError(f"tool call {function.get('name')!r}: arguments are not JSON: {exc}") from None
    if not isinstance(arguments, dict):
        raise LlmcliError(f"tool call {function.get('name')!r}: arguments must be a JSON object")
    params = "\n".join(
        f'<{DSML}parameter name="{key}" string="{"true" if isinstance(value, str) else "false"}">'
        f'{value if isinstance(value, str) else _json(value)}</{DSML}parameter>'
        for key, value in arguments.items())
    return f'<{DSML}invoke name="{function.get("name")}">\n{params}\n</{DSML}invoke>'


def _reasoning(message: dict) -> str | None:
    return message.get("reasoning") or message.get("reasoning_content")


def _assistant(message: dict, after_last_user: bool, thinking: bool) -> str:
    calls = message.get("tool_calls") or []
    text = ""
    if thinking and after_last_user:
        if not (_reasoning(message) or calls):
            raise LlmcliError("thinking mode: a reply after the last user message needs its reasoning")
        text = (_reasoning(message) or "") + END_THINK
    text += message.get("content") or ""
    if calls:
        invokes = "\n".join(_tool_call(call) for call in calls)
        text += f"\n\n<{DSML}function_calls>\n{invokes}\n</{DSML}function_calls>"
    return text + EOS


def _tool_result(messages: list[dict], index: int, last_user: int, thinking: bool) -> str:
    """The n-th tool message after an assistant turn answers its n-th call; the first opens
    <function_results>, the last closes it and reopens the reply."""
    owner = index - 1
    while owner >= 0 and messages[owner].get("role") == "tool":
        owner -= 1
    calls = messages[owner].get("tool_calls") if owner >= 0 and messages[owner].get("role") == "assistant" else None
    order = index - owner
    if not calls or len(calls) < order:
        raise LlmcliError(f"message {index}: a tool result without a matching tool call")
    text = "\n\n<function_results>" if order == 1 else ""
    text += f"\n<result>{messages[index].get('content') or ''}</result>"
    if order == len(calls):
        text += "\n</function_results>\n\n" + (THINK if thinking and index >= last_user else END_THINK)
    return text


def _user_turn(content: str, is_last_user: bool, thinking: bool) -> str:
    return USER + content + ASSISTANT + (THINK if thinking and is_last_user else END_THINK)


def _render(messages: list[dict], index: int, last_user: int, thinking: bool) -> str:
    message = messages[index]
    role = message.get("role")
    if role == "system":
        return (message.get("content") or "") + _extras(message)
    if role == "user":
        return _user_turn(message.get("content") or "", index == last_user, thinking)
    if role == "developer":
        if not message.get("content"):
            raise LlmcliError("a developer message needs content")
        text = _extras(message) + "\n\n# The user's message is: " + message["content"]
        return _user_turn(text, index == last_user, thinking)
    if role == "tool":
        return _tool_result(messages, index, last_user, thinking)
    if role == "assistant":
        return _assistant(message, index > last_user, thinking)
    raise LlmcliError(f"unknown chat role {role!r} (DeepSeek-V3.2 knows system, user, developer, assistant, tool)")


def encode_messages(messages: list[dict], thinking: bool = False, drop_thinking: bool = True,
                    add_bos: bool = True) -> str:
    """The prompt text for `messages` (OpenAI-style dicts); `thinking` selects thinking mode. In thinking
    mode with `drop_thinking`, replies before the last user turn lose their reasoning and earlier developer
    messages are left out, as the released encoder does."""
    last_user = max((i for i, m in enumerate(messages) if m.get("role") in ("user", "developer")), default=-1)
    if thinking and drop_thinking:
        kept = []
        for i, message in enumerate(messages):
            if message.get("role") in ("user", "system", "tool") or i >= last_user:
                kept.append(message)
            elif message.get("role") == "assistant":
                kept.append({k: v for k, v in message.items() if k not in ("reasoning", "reasoning_content")})
        messages = kept
        last_user = max((i for i, m in enumerate(messages) if m.get("role") in ("user", "developer")), default=-1)
    return (BOS if add_bos else "") + "".join(_render(messages, i, last_user, thinking) for i in range(len(messages)))


def _split_reasoning(message: dict) -> dict:
    """A reply kept as generated in thinking mode ("reasoning</think>answer", `chat` stores it so) becomes
    its answer plus `reasoning_content`, so that the format can drop the reasoning from later turns."""
    content = message.get("content")
    if message.get("role") != "assistant" or not isinstance(content, str) or END_THINK not in content:
        return message
    if _reasoning(message):
        return {**message, "content": content.split(END_THINK, 1)[1]}
    reasoning, answer = content.split(END_THINK, 1)
    return {**message, "content": answer, "reasoning_content": reasoning.removeprefix(THINK)}


def apply_chat_format(messages: list[dict], add_generation_prompt: bool = True, enable_thinking: bool | None = None,
                      tools: list[dict] | None = None, **_: Any) -> str:
    """`Tokenizer.apply_chat_template`'s signature over `encode_messages`. The generation prompt is part of
    every user turn in this format, so `add_generation_prompt` changes nothing; request-level `tools` join
    the system message (one is added at the front when there is none); replies that still hold their
    reasoning before </think> are split first."""
    messages = [_split_reasoning(dict(m)) for m in messages]
    if tools:
        if messages and messages[0].get("role") == "system":
            messages[0]["tools"] = tools
        else:
            messages.insert(0, {"role": "system", "content": "", "tools": tools})
    return encode_messages(messages, thinking=bool(enable_thinking))


def with_builtin_chat_format(tokenizer, family: str):
    """A DeepSeek-V3.2 tokenizer without a template gets this format (V3.2-Exp ships a Jinja template,
    which is used as it is); any other tokenizer is returned unchanged."""
    if family == "deepseek_v32" and tokenizer.chat_template is None:
        return tokenizer.with_chat_encoder(apply_chat_format, NAME)
    return tokenizer
