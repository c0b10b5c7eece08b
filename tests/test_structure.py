"""The layout's rules, checked on the source (DESIGN.md): no import cycles inside llmcli (imports inside
functions count), `models/` pure, LLMCLI_* variables read in one place, small files and functions."""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "llmcli"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(path: Path) -> set[str]:
    """The llmcli modules a file imports, wherever the import statement stands. `from a import b` names
    module a.b when b is one, else a."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("llmcli")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("llmcli"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
    return {name for name in found if name in MODULES}


GRAPH = {name: imports_of(path) - {name} for name, path in MODULES.items()}


def cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return out


def test_the_graph_is_read():
    assert "llmcli.backends.prepare" in GRAPH["llmcli.loader"]
    assert "llmcli.models.base" in GRAPH["llmcli.models.qwen"]
    assert "llmcli.cli.app" in GRAPH["llmcli.cli.generate"]


def test_no_import_cycles():
    assert cycles() == []
    hidden = [name for name, path in MODULES.items() if re.search(r"import_module|__import__", path.read_text())]
    assert hidden == []  # imports by name would hide edges from this check


def test_models_are_pure_tensor_code():
    allowed = {"llmcli.models", "llmcli.config", "llmcli.config_fields", "llmcli.config_deepseek",
               "llmcli.config_deepseek_v4", "llmcli.config_qwen1", "llmcli.errors"}
    for name, path in MODULES.items():
        if not name.startswith("llmcli.models"):
            continue
        outside = {m for m in GRAPH[name] if not m.startswith("llmcli.models.")} - allowed
        assert not outside, f"{name} imports {sorted(outside)}"
        code = " ".join(token.string for token in tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
                        if token.type not in (tokenize.STRING, tokenize.COMMENT))
        for banned in ("environ", "getenv", "is_compiling", "_dynamo", "open (", "print ("):
            assert banned not in code, f"{name} uses {banned}"


def test_llmcli_variables_are_read_in_options_only():
    read = re.compile(r"""(environ(\.get)?|getenv)\s*[\[(]\s*["']LLMCLI_""")
    readers = sorted(name for name, path in MODULES.items() if read.search(path.read_text()))
    assert readers == ["llmcli.options"]


def test_files_and_model_functions_stay_small():
    for name, path in MODULES.items():
        assert len(path.read_text().splitlines()) <= 600, name
        if name.startswith("llmcli.models"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    length = node.end_lineno - node.lineno + 1
                    assert length <= 60, f"{name}.{node.name} has {length} lines"


def test_every_kernel_source_ships_in_the_package():
    """A wheel carries what the kernel build reads: each source and included file matches the package data
    (`dispatch.h` once did not, and an installed llmcli could not build its kernels)."""
    import fnmatch
    import re

    from llmcli.backends import cpu_kernels

    # tomllib is Python 3.11+: the one line is read as it is written
    line = re.search(r"^\[tool\.setuptools\.package-data\]\nllmcli = \[(.*)\]$",
                     (PACKAGE.parent / "pyproject.toml").read_text(), re.MULTILINE)
    assert line, "pyproject.toml: no package data for llmcli"
    patterns = re.findall(r'"([^"]+)"', line.group(1))
    for path in cpu_kernels.SOURCES + cpu_kernels.INCLUDED:
        relative = path.relative_to(PACKAGE).as_posix()
        assert any(fnmatch.fnmatch(relative, pattern) for pattern in patterns), relative
