"""DeepSeek-V4's chat format, written natively.

Like V3.2, V4 ships its format as a Python file (`encoding/encoding_dsv4.py`), which llmcli never runs. This
module writes the same text for the same messages:

  <BOS>{system}[tools][response format]
  <｜User｜>{user}<｜Assistant｜></think>{reply}<EOS>               chat mode
  <｜User｜>{user}<｜Assistant｜><think>                            thinking mode, the last user turn
  ...{reasoning}</think>{reply}<EOS>                                a reply after the last user turn

Differences from V3.2: the generation prompt follows only the user turn that an assistant reply (or the
end) follows; tool results are no role of their own but `<tool_result>` blocks inside a user turn (results
of one call batch, ordered as the calls, then any user text, joined by blank lines); calls are a
`<｜DSML｜tool_calls>` block; a developer message is a user turn with its tools and schema after the text;
messages with tools keep every reply's reasoning; thinking mode at "max" effort opens with a preamble.
"""

from __future__ import annotations

import json
from typing import Any

from llmcli.chat_dsv32 import _split_reasoning
from llmcli.errors import LlmcliError

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT, REMINDER = "<｜User｜>", "<｜Assistant｜>", "<｜latest_reminder｜>"
THINK, END_THINK = "<think>", "</think>"
DSML = "｜DSML｜"
NAME = "DeepSeek-V4 chat format (built in)"
KEPT_ROLES = ("user", "system", "tool", "latest_reminder")

TOOLS_TEMPLATE = f"""## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "<{DSML}tool_calls>" block like the following:

<{DSML}tool_calls>
<{DSML}invoke name="$TOOL_NAME">
<{DSML}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{DSML}parameter>
...
</{DSML}invoke>
<{DSML}invoke name="$TOOL_NAME2">
...
</{DSML}invoke>
</{DSML}tool_calls>

String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by {THINK}), you MUST output your complete reasoning inside {THINK}...{END_THINK} BEFORE any tool calls or final response.

Otherwise, output directly after {END_THINK} with tool calls or final response.

### Available Tool Schemas

{{schemas}}

You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.
"""  # noqa: E501  (the model was trained on these exact lines)
RESPONSE_FORMAT = "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"
EFFORT_MAX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial scenarios.\n"  # noqa: E501
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n"  # noqa: E501
)


def _json(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except UnicodeEncodeError:  # lone surrogates
        return json.dumps(value, ensure_ascii=True)


def _extras(message: dict) -> str:
    """Tools and response format, each after a blank line (system and developer messages)."""
    text = ""
    if message.get("tools"):
        schemas = "\n".join(_json(t["function"] if "function" in t else t) for t in message["tools"])
        text += "\n\n" + TOOLS_TEMPLATE.replace("{schemas}", schemas)
    if message.get("response_format"):
        text += "\n\n" + RESPONSE_FORMAT + _json(message["response_format"])
    return text


def _arguments(function: dict) -> dict:
    """A call's arguments: a JSON object string (the released encoder wraps anything else as {"arguments":
    raw}, as here) or, for convenience, an object already parsed."""
    raw = function.get("arguments")
    if isinstance(raw, dict):
        return raw
    try:
        parsed = json.loads(raw)
    except (TypeError, ValueError):
        return {"arguments": raw}
    if not isinstance(parsed, dict):
        raise LlmcliError(f"tool call {function.get('name')!r}: arguments must be a JSON object")
    return parsed


def _tool_calls(calls: list[dict]) -> str:
    invokes = []
    for call in calls:
        function = call.get("function", call)
        params = "\n".join(
            f'<{DSML}parameter name="{key}" string="{"true" if isinstance(value, str) else "false"}">'
            f'{value if isinstance(value, str) else _json(value)}</{DSML}parameter>'
            for key, value in _arguments(function).items())
        invokes.append(f'<{DSML}invoke name="{function.get("name")}">\n{params}\n</{DSML}invoke>')
    return f"\n\n<{DSML}tool_calls>\n" + "\n".join(invokes) + f"\n</{DSML}tool_calls>"


def _tool_text(content) -> str:
    if isinstance(content, list):  # content parts: text kept, anything else named
        return "\n\n".join(p.get("text", "") if p.get("type") == "text" else f"[Unsupported {p.get('type')}]"
                           for p in content)
    return content or ""


def _merge_tool_results(messages: list[dict]) -> list[dict]:
    """Tool messages become blocks of a user turn, and a user message right after joins that turn (as the
    released encoder merges them); results are put in the order of the calls they answer (by id)."""
    merged: list[dict] = []
    order: dict[str, int] = {}
    for message in messages:
        role = message.get("role")
        if role == "assistant" and message.get("tool_calls"):
            order = {(c.get("id") or c.get("function", {}).get("id", "")): i
                     for i, c in enumerate(message["tool_calls"])}
            order.pop("", None)
        if role in ("tool", "user"):
            block = ("tool", _tool_text(message.get("content")), message.get("tool_call_id", "")) if role == "tool" \
                else ("text", message.get("content") or "", "")
            if merged and "blocks" in merged[-1]:
                merged[-1]["blocks"].append(block)
            else:
                merged.append({"role": "user", "blocks": [block], "order": order})
        else:
            merged.append(dict(message))
    for message in merged:
        if "blocks" in message:
            message["blocks"] = _ordered(message.pop("blocks"), message.pop("order"))
    return merged


def _ordered(blocks: list[tuple], order: dict[str, int]) -> list[tuple]:
    results = [b for b in blocks if b[0] == "tool"]
    if len(results) < 2 or not order:
        return blocks
    results = iter(sorted(results, key=lambda b: order.get(b[2], 0)))
    return [next(results) if b[0] == "tool" else b for b in blocks]


def _last_user(messages: list[dict]) -> int:
    return max((i for i, m in enumerate(messages) if m.get("role") in ("user", "developer")), default=-1)


def _drop_thinking(messages: list[dict]) -> list[dict]:
    """Before the last user turn: replies lose their reasoning, developer messages go."""
    last = _last_user(messages)
    kept = []
    for i, message in enumerate(messages):
        if message.get("role") in KEPT_ROLES or i >= last:
            kept.append(message)
        elif message.get("role") == "assistant":
            kept.append({k: v for k, v in message.items() if k not in ("reasoning_content", "reasoning")})
    return kept


def _body(message: dict, index: int, last_user: int, thinking: bool, drop: bool) -> str:
    role = message.get("role")
    if role == "system":
        return (message.get("content") or "") + _extras(message)
    if role == "developer":
        if not message.get("content"):
            raise LlmcliError("a developer message needs content")
        return USER + message["content"] + _extras(message)
    if role == "user":
        return USER + "\n\n".join(f"<tool_result>{text}</tool_result>" if kind == "tool" else text
                                  for kind, text, _ in message["blocks"])
    if role == "latest_reminder":
        return REMINDER + (message.get("content") or "")
    if role == "assistant":
        reasoning = message.get("reasoning_content") or message.get("reasoning") or ""
        text = reasoning + END_THINK if thinking and (not drop or index > last_user) else ""
        calls = _tool_calls(message["tool_calls"]) if message.get("tool_calls") else ""
        return text + (message.get("content") or "") + calls + EOS
    raise LlmcliError(f"unknown chat role {role!r} (DeepSeek-V4 knows system, user, developer, assistant, tool, "
                      "latest_reminder)")


def encode_messages(messages: list[dict], thinking: bool = False, drop_thinking: bool = True,
                    add_bos: bool = True, reasoning_effort: str | None = None) -> str:
    """The prompt text for `messages` (OpenAI-style dicts); `thinking` selects thinking mode, and
    `reasoning_effort` "max" adds its preamble there. `drop_thinking` (off whenever a message has tools):
    replies before the last user turn lose their reasoning in thinking mode."""
    if reasoning_effort not in (None, "high", "max"):
        raise LlmcliError(f"reasoning effort {reasoning_effort!r}: choose high or max")
    messages = _merge_tool_results(messages)
    drop = drop_thinking and not any(m.get("tools") for m in messages)
    if thinking and drop:
        messages = _drop_thinking(messages)
    last_user = _last_user(messages)
    text = BOS if add_bos else ""
    for i, message in enumerate(messages):
        if i == 0 and thinking and reasoning_effort == "max":
            text += EFFORT_MAX
        text += _body(message, i, last_user, thinking, drop)
        following = messages[i + 1].get("role") if i + 1 < len(messages) else None
        if message.get("role") in ("user", "developer") and following in (None, "assistant", "latest_reminder"):
            opens = thinking and (not drop or i >= last_user)
            text += ASSISTANT + (THINK if opens else END_THINK)
    return text


def apply_chat_format(messages: list[dict], add_generation_prompt: bool = True, enable_thinking: bool | None = None,
                      tools: list[dict] | None = None, reasoning_effort: str | None = None, **_: Any) -> str:
    """`Tokenizer.apply_chat_template`'s signature over `encode_messages`. The generation prompt follows
    the last user turn by the format itself; request-level `tools` join the system message (one is added
    at the front when there is none); replies that still hold their reasoning before </think> are split."""
    messages = [_split_reasoning(dict(m)) for m in messages]
    if tools:
        if messages and messages[0].get("role") == "system":
            messages[0]["tools"] = tools
        else:
            messages.insert(0, {"role": "system", "content": "", "tools": tools})
    return encode_messages(messages, thinking=bool(enable_thinking), reasoning_effort=reasoning_effort)


def with_v4_chat_format(tokenizer, family: str):
    """A DeepSeek-V4 tokenizer without a template gets this format; any other is returned unchanged."""
    if family == "deepseek_v4" and tokenizer.chat_template is None:
        return tokenizer.with_chat_encoder(apply_chat_format, NAME)
    return tokenizer
