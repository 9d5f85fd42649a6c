"""The import graph of motif_train/data/ is acyclic — function-level imports included, so a circle cannot come
back hidden behind a deferred import — and the names moved to shard_format.py stay importable where they were."""

from __future__ import annotations

import ast
from pathlib import Path

import motif_train.data

PACKAGE = "motif_train.data"
DATA = Path(motif_train.data.__file__).parent


def _modules() -> dict[str, Path]:
    return {p.stem: p for p in sorted(DATA.glob("*.py")) if p.stem != "__init__"}


def _resolve(node: ast.ImportFrom) -> str | None:
    """Absolute module a `from ... import` names (relative levels resolved against motif_train.data)."""
    if node.level == 0:
        return node.module
    base = PACKAGE.split(".")
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(path: Path, siblings: set[str]) -> dict[str, int]:
    """{sibling module: first line importing it} over EVERY import statement of the file (module level,
    functions, methods, `if TYPE_CHECKING:` blocks): `import motif_train.data.x`, `from motif_train.data import
    x`, `from .x import y`, `from . import x`."""
    out: dict[str, int] = {}

    def add(name: str, line: int) -> None:
        if name in siblings:
            out.setdefault(name, line)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith(PACKAGE + "."):
                    add(a.name[len(PACKAGE) + 1:].split(".")[0], node.lineno)
        elif isinstance(node, ast.ImportFrom):
            mod = _resolve(node)
            if mod == PACKAGE:
                for a in node.names:
                    add(a.name, node.lineno)
            elif mod and mod.startswith(PACKAGE + "."):
                add(mod[len(PACKAGE) + 1:].split(".")[0], node.lineno)
    return out


def import_graph() -> dict[str, dict[str, int]]:
    mods = _modules()
    return {m: imports_of(p, set(mods) - {m}) for m, p in mods.items()}


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, {})):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (c := visit(n)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_parser_sees_every_import_form(tmp_path):
    src = tmp_path / "x.py"
    src.write_text("import motif_train.data.a\nfrom motif_train.data import b\nfrom .c import f\n"
                   "from . import d as D\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .e import g\n"
                   "def h():\n    from .f import k  # deferred\n    import os\n")
    assert imports_of(src, set("abcdefz")) == {"a": 1, "b": 2, "c": 3, "d": 4, "e": 7, "f": 9}
    assert find_cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {}}) is None


def test_data_import_graph_is_acyclic():
    graph = import_graph()
    assert {"shards", "sample_index", "tar_index", "shard_format", "loader", "plan"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle among motif_train/data modules: " + " -> ".join(
        f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:], strict=False)) + f" -> {cycle[-1]}"
    assert graph["shard_format"] == {}  # the shared names' home imports no data module


def test_moved_names_still_importable():
    from motif_train.data import sample_index, shard_format, shards, tar_index

    for name in ("CorruptSample", "parse_index", "index_name", "member_key", "MANIFEST_NAME", "MANIFEST_VERSION",
                 "EMPTY_PROMPT_NAME", "FAILURES_NAME", "SHARDS_DIR", "INDEX_SUFFIX", "INDEX_VERSION"):
        assert getattr(shards, name) is getattr(shard_format, name), name
    assert tar_index.member_key is shard_format.member_key
    assert shards.write_sample_index is sample_index.write_sample_index
