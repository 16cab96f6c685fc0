"""The architecture holds: imports point down, DVC stages list what they import, dvc.lock is true.

These tests read the real code (its import statements, `dvc.yaml`) and ask real DVC; they fail
with the edge, the missing dep or the stale stage named, and how to fix it.
"""

from __future__ import annotations

import ast
import json
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from _datasets import REPO

SRC = REPO / "src"
PACKAGE = SRC / "imgcls"

# Bottom -> top. A module may import its own layer or lower ones; docs/architecture.md draws it.
LAYERS: list[tuple[str, ...]] = [
    ("imgcls", "imgcls.errors", "imgcls.config", "imgcls.io", "imgcls.stage"),
    ("imgcls.task",),
    ("imgcls.tracking",),
    ("imgcls.data",),
    ("imgcls.models",),
    ("imgcls.training",),
    ("imgcls.inference", "imgcls.serving"),  # imgcls.serving: shim for models logged before
    ("imgcls.evaluation",),
    ("imgcls.retrain", "imgcls.summary", "imgcls.tune", "imgcls.compare", "imgcls.cli"),
]
# The one loop allowed: timm-style self-registration (custom models register on import).
ALLOWED_CYCLE = {"imgcls.models", "imgcls.models.registry", "imgcls.models.custom"}
LONG_MODULE_LINES = 400
LONG_MODULE_REASON = "Long because"


def module_name(path: Path) -> str:
    """`src/imgcls/data/split/__init__.py` -> `imgcls.data.split`."""
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    """Every module of the package, by dotted name."""
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules a file imports anywhere (top level, functions, TYPE_CHECKING alike)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from imgcls.data import split` imports the submodule `imgcls.data.split`
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (itself excluded)."""
    modules = project_modules()
    return {name: imported(path, modules) - {name} for name, path in modules.items()}


def layer_of(module: str) -> int:
    """The layer of a module: the longest matching prefix in LAYERS."""
    best, depth = -1, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            # "imgcls" is the package's own __init__ only, not a prefix of everything
            below = module.startswith(prefix + ".") and prefix != "imgcls"
            if (module == prefix or below) and len(prefix) > depth:
                best, depth = index, len(prefix)
    return best


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's strongly connected components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_layer() -> None:
    """A new top-level module must be placed in LAYERS (and in docs/architecture.md)."""
    missing = [m for m in project_modules() if layer_of(m) < 0]
    assert not missing, f"modules without a layer: {missing}; add them to LAYERS in {__file__}"


def test_imports_point_down() -> None:
    """No module imports a higher layer."""
    up = [
        f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
        for a, targets in import_graph().items()
        for b in sorted(targets)
        if layer_of(b) > layer_of(a)
    ]
    assert not up, "imports running back up a layer:\n  " + "\n  ".join(up)


def test_no_import_cycles_but_the_registry() -> None:
    """The import graph has no cycle except the registry's self-registration."""
    cycles = [c for c in strongly_connected(import_graph()) if not c <= ALLOWED_CYCLE]
    assert not cycles, f"import cycles: {[sorted(c) for c in cycles]}"


def test_cycle_finder_finds_a_cycle() -> None:
    """The checker itself can fail (a cycle and an upward edge are seen)."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert strongly_connected(graph) == [{"a", "b", "c"}]
    assert layer_of("imgcls.data.split") < layer_of("imgcls.training.trainer")


def test_long_modules_say_why() -> None:
    """A module over ~400 lines opens with the reason it is one module."""
    unexplained = []
    for name, path in project_modules().items():
        text = path.read_text()
        lines = text.count("\n")
        doc = ast.get_docstring(ast.parse(text)) or ""
        if lines > LONG_MODULE_LINES and LONG_MODULE_REASON not in doc:
            unexplained.append(f"{name} ({lines} lines)")
    assert not unexplained, (
        f"split these modules, or say in their docstring '{LONG_MODULE_REASON} ...': {unexplained}"
    )


# ----------------------------------------------------------------------------- DVC deps


def stage_script(cmd: str) -> Path:
    """`python pipeline/train.py --x y` -> REPO/pipeline/train.py."""
    words = shlex.split(" ".join(cmd.split()))
    script = next(w for w in words if w.endswith(".py"))
    return REPO / script


def stage_modules(script: Path) -> set[str]:
    """Project modules with code that a stage script imports, transitively (lazy ones too)."""
    modules = project_modules()
    graph = import_graph()
    todo = list(imported(script, modules))
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parent = name.rpartition(".")[0]
        if parent and parent != "imgcls":  # importing a.b.c runs a/b/__init__.py first
            todo.append(parent)
        todo.extend(graph[name])
    return {m for m in seen if has_code(modules[m])}


def has_code(path: Path) -> bool:
    """False for an empty `__init__.py` (or one holding only a docstring): nothing to rerun for."""
    body = ast.parse(path.read_text()).body
    return any(not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)) for n in body)


def covered(path: str, deps: list[str]) -> bool:
    """Whether a dep (the file itself, or a folder above it) is listed."""
    return any(path == d.rstrip("/") or path.startswith(d.rstrip("/") + "/") for d in deps)


def test_dvc_stages_list_every_module_they_import() -> None:
    """Editing a module reruns every stage that imports it."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    modules = project_modules()
    missing = []
    for name, stage in stages.items():
        script = stage_script(stage["cmd"])
        deps = [str(d) for d in stage.get("deps", [])]
        needed = [str(script.relative_to(REPO))] + [
            str(modules[m].relative_to(REPO)) for m in stage_modules(script)
        ]
        missing += [f"{name}: {p}" for p in sorted(needed) if not covered(p, deps)]
    assert not missing, "dvc.yaml deps missing (add them to the stage):\n  " + "\n  ".join(missing)


def test_stage_modules_follow_lazy_imports(tmp_path: Path) -> None:
    """The dep finder sees an import inside a function (the checker can fail)."""
    script = tmp_path / "stage.py"
    script.write_text("def main():\n    from imgcls.data import phash\n")
    assert "imgcls.data.phash" in stage_modules(script)
    assert not covered("src/imgcls/data/phash.py", ["src/imgcls/data/split"])


def _git_tracked(path: str) -> bool:
    """Whether a path (or anything under it) is committed to git."""
    out = subprocess.run(
        ["git", "ls-files", "--", path], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    return bool(out.strip())


@pytest.mark.skipif(not (REPO / ".git").exists(), reason="not a git checkout")
def test_committed_dvc_lock_matches_the_code() -> None:
    """`dvc status` finds no changed code or params dep: main always reproduces.

    Data deps (data/..., outputs of earlier stages) are not in git and are left out; they are
    what `dvc pull` or `dvc repro` brings.
    """
    dvc = shutil.which("dvc") or str(Path(__import__("sys").executable).parent / "dvc")
    proc = subprocess.run(
        [dvc, "status", "--json"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    stale = []
    for stage, entries in json.loads(proc.stdout or "{}").items():
        for entry in entries:
            if not isinstance(entry, dict):
                continue
            for path, change in entry.get("changed deps", {}).items():
                name = path.split(":")[0]
                if name.startswith("params.yaml") or _git_tracked(name):
                    stale.append(f"{stage}: {path} {change}")
    assert not stale, (
        "the committed dvc.lock does not match the committed code/params; run `make pipeline` "
        "and commit dvc.lock (and the metrics it wrote):\n  " + "\n  ".join(stale)
    )
