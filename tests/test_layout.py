"""The package's layout rules, checked on the source text alone (ast; nothing is imported or run).

- No import cycle between files, nor between the folders `tasks`, `patching`, `graphs`, `reports`. An import
  written inside a function counts as an edge like one at the top: a lazy import hides a cycle, it does not
  remove it.
- `tasks` imports none of the other folders; `patching` imports only `tasks`; `graphs` never imports `reports`.
- An import inside a function is allowed only for an optional heavy dependency named in `OPTIONAL`, with a
  comment on that line or the line above saying so; everything else is imported at the top of its module.
- No source file over 400 lines; every package folder's `__init__.py` has a docstring.
- The README's layout table has one row per folder (every package folder, `bench/`, `tests/`), and every file
  a row names is in that folder.
- No `Any` in a public signature (a function, method or dataclass field whose name has no leading underscore):
  public types say what they take (`object` where anything goes).
- No list of discovery methods or circuit searches outside their registry (`patching/methods/`): a literal tuple,
  list, set or dict (keys) naming two or more of them is a second list that adding a method would have to edit.
"""

from __future__ import annotations

import ast
import re
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "circuitlab"
FOLDERS = ("tasks", "patching", "graphs", "reports")
MAY_IMPORT = {"tasks": set(), "patching": {"tasks"}, "graphs": {"tasks", "patching"},
              "reports": {"tasks", "patching", "graphs"}}
MAX_LINES = 400
# optional dependencies a function may import where it needs them (not installed everywhere, or slow to import
# and needed by one command): the distributed executor, the browser test driver, the interpretability
# references, interactive figures and the tracr compiler stack
OPTIONAL = {"ray", "playwright", "pyvene", "plotly", "tracr", "jax", "haiku", "chex"}


def _sources() -> list[Path]:
    files = [ROOT / "__init__.py"]
    for folder in FOLDERS:
        files += sorted(p for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)
    return files


def _module(path: Path) -> str:
    parts = [PACKAGE, *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@lru_cache(maxsize=1)
def _modules() -> dict[str, Path]:
    return {_module(p): p for p in _sources()}


class _Imports(ast.NodeVisitor):
    """Every import of a file: (imported module name, line, inside a function?)."""

    def __init__(self) -> None:
        self.found: list[tuple[str, int, bool]] = []
        self.depth = 0

    def _function(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_Import(self, node: ast.Import) -> None:
        self.found += [(alias.name, node.lineno, self.depth > 0) for alias in node.names]

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        assert node.level == 0, f"relative import at line {node.lineno}: write the absolute `circuitlab.` name"
        base = node.module or ""
        # `from circuitlab.x import y` imports the module circuitlab.x.y when it is one, else a name of circuitlab.x
        self.found += [(f"{base}.{alias.name}", node.lineno, self.depth > 0) for alias in node.names]


@lru_cache(maxsize=1)
def _imports() -> dict[str, list[tuple[str, int, bool]]]:
    out = {}
    for module, path in _modules().items():
        visitor = _Imports()
        visitor.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        out[module] = visitor.found
    return out


def _internal(name: str) -> str | None:
    """The package module an imported name refers to (the longest module prefix), or None if external."""
    modules = _modules()
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


@lru_cache(maxsize=1)
def _edges() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in _modules()}
    for module, found in _imports().items():
        for name, _, _ in found:
            target = _internal(name)
            if target and target != module:
                graph[module].add(target)
    return graph


def _folder(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one member (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return out


def test_no_import_cycle_between_files():
    assert _cycles(_edges()) == []


def test_folders_import_only_what_they_may():
    wrong = []
    for module, targets in _edges().items():
        here = _folder(module)
        for target in sorted(targets):
            there = _folder(target)
            if here and there and there != here and there not in MAY_IMPORT[here]:
                wrong.append(f"{module} imports {target}")
    assert wrong == []


def test_no_import_cycle_between_folders():
    graph: dict[str, set[str]] = {f: set() for f in FOLDERS}
    for module, targets in _edges().items():
        for target in targets:
            here, there = _folder(module), _folder(target)
            if here and there and here != there:
                graph[here].add(there)
    assert _cycles(graph) == []


def test_imports_inside_functions_are_optional_dependencies_with_a_comment():
    wrong = []
    for module, found in _imports().items():
        lines = _modules()[module].read_text(encoding="utf-8").splitlines()
        for name, line, inside in found:
            if not inside:
                continue
            top = name.split(".")[0]
            commented = "#" in lines[line - 1] or lines[line - 2].strip().startswith("#")
            if top not in OPTIONAL or not commented:
                wrong.append(f"{module}:{line} imports {name} inside a function")
    assert wrong == []


def test_source_files_are_short():
    long = {str(p.relative_to(ROOT)): n for p in _sources()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}


def test_every_package_folder_says_what_it_holds():
    folders = {p.parent for p in _sources()}
    missing = [str(f.relative_to(ROOT)) for f in sorted(folders)
               if not (f / "__init__.py").is_file() or not ast.get_docstring(ast.parse((f / "__init__.py").read_text()))]
    assert missing == []


def test_the_checks_see_a_cycle_and_a_forbidden_import():
    """The checker itself: a two-file cycle is found, and so is a patching → graphs import."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    assert _internal("circuitlab.patching.engine.Runner") == "circuitlab.patching.engine"
    assert _internal("torch.nn") is None
    assert len(_edges()) == len(_sources()) and sum(map(len, _edges().values())) > 100  # it sees the real graph


REGISTRY = ROOT / "patching" / "methods"


def _registered_names() -> set[str]:
    """Names the registry declares: the first argument of every `Method(...)` and `CircuitSearch(...)` call in
    `patching/methods/` (read from the source, as the registry's files write them)."""
    names = set()
    for path in REGISTRY.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id in ("Method", "CircuitSearch") and node.args
                    and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                names.add(node.args[0].value)
    return names


def _method_lists(tree: ast.AST, names: set[str]) -> list[int]:
    """Lines of literal tuples/lists/sets (or dict keys) that hold two or more of `names`."""
    lines = []
    for node in ast.walk(tree):
        items = node.keys if isinstance(node, ast.Dict) else node.elts if isinstance(
            node, (ast.Tuple, ast.List, ast.Set)) else []
        found = {k.value for k in items if isinstance(k, ast.Constant) and k.value in names}
        if len(found) >= 2:
            lines.append(node.lineno)
    return lines


def test_method_lists_come_from_the_registry():
    names = _registered_names()
    assert {"eap-ig", "acdc", "ifr", "random", "greedy", "ranking-edges"} <= names  # it reads the real registry
    sources = [p for p in _sources() if REGISTRY not in p.parents] + sorted((ROOT / "bench").glob("*.py"))
    wrong = [f"{p.relative_to(ROOT)}:{line}" for p in sources
             for line in _method_lists(ast.parse(p.read_text(encoding="utf-8")), names)]
    assert wrong == []
    assert _method_lists(ast.parse('x = ("eap", "eap-ig")\ny = {"acdc": 1, "greedy": 2}'), names) == [1, 2]


def _public_any(tree: ast.AST) -> list[str]:
    """Public functions' parameters and returns, and public classes' annotated fields, that mention `Any`."""
    found = []

    def mentions_any(node: ast.AST | None) -> bool:
        return node is not None and any(
            (isinstance(n, ast.Name) and n.id == "Any") or (isinstance(n, ast.Attribute) and n.attr == "Any")
            or (isinstance(n, ast.Constant) and isinstance(n.value, str) and "Any" in n.value.split("[")[0].split("|"))
            for n in ast.walk(node))

    def visit(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (
                    not node.name.startswith("_") or (node.name.startswith("__") and node.name.endswith("__"))):
                a = node.args
                for arg in [*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg]:
                    if arg is not None and mentions_any(arg.annotation):
                        found.append(f"{node.lineno} {prefix}{node.name}({arg.arg})")
                if mentions_any(node.returns):
                    found.append(f"{node.lineno} {prefix}{node.name} -> Any")
            elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                for item in node.body:
                    if (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
                            and not item.target.id.startswith("_") and mentions_any(item.annotation)):
                        found.append(f"{item.lineno} {node.name}.{item.target.id}")
                visit(node.body, f"{node.name}.")

    visit(tree.body, "")
    return found


def test_no_any_in_public_signatures():
    wrong = [f"{p.relative_to(ROOT)}:{hit}" for p in _sources() for hit in _public_any(ast.parse(p.read_text()))]
    assert wrong == []
    example = ast.parse("def f(x: Any, *, y: dict[str, Any]) -> Any: ...\ndef _g(x: Any) -> Any: ...\n"
                        "class C:\n    a: list[Any]\n    _b: Any\n    def m(self, z: 'Any') -> None: ...")
    assert _public_any(example) == ["1 f(x)", "1 f(y)", "1 f -> Any", "4 C.a", "6 C.m(z)"]


def _layout_rows(readme: str) -> dict[str, str]:
    """{folder: its row} of the README's layout table (the rows under `## Layout` that start with a folder)."""
    section = readme.split("\n## Layout", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = line.split("|")
        if len(cells) > 2 and re.fullmatch(r" `([\w/]+/)` ", cells[1]):
            rows[cells[1].strip(" `")] = line
    return rows


def test_readme_layout_table_matches_the_folders():
    rows = _layout_rows((ROOT / "README.md").read_text(encoding="utf-8"))
    folders = {str(p.parent.relative_to(ROOT)) + "/" for p in _sources() if p.parent != ROOT}
    assert set(rows) == folders | {"bench/", "tests/"}
    missing = [f"{folder}{name}" for folder, line in rows.items() for name in re.findall(r"`(\w+\.py)`", line)
               if not (ROOT / folder / name).is_file()]
    assert missing == []
