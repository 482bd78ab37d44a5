"""The walls between packages (docs/architecture.md, STYLE): checked on the imports of every module.

- data never imports models, rules or the engine (a loader knows nothing of what trains on it);
- rules never import the engine (a rule is a loss and its parameters, not a training loop);
- losses see no optimizer, config or logger: `rules/losses.py` imports nothing of localssl beyond models' layers
  and the registry;
- no import cycle between localssl modules at import time;
- no module outside ``rules/`` names a rule: the code around the rules reads what it needs of them from the
  registry, never by name (docs/architecture.md).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "localssl"


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path, top_level_only: bool = False) -> set[str]:
    """The localssl modules ``path`` imports (``top_level_only``: only those run at import time)."""
    tree = ast.parse(path.read_text())
    mod = module_name(path)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("localssl")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.startswith("localssl"):
                found.add(name)
                found |= {f"{name}.{a.name}" for a in node.names}
    return found


MODULES = sorted(PKG.rglob("*.py"))


def _in(names: set[str], package: str) -> set[str]:
    return {n for n in names if n == package or n.startswith(package + ".")}


@pytest.mark.parametrize("path", [p for p in MODULES if "data" in p.relative_to(PKG).parts[:1]], ids=str)
def test_data_imports_no_models_rules_or_engine(path):
    found = imports(path)
    for wall in ("localssl.models", "localssl.rules", "localssl.engine", "localssl.builder"):
        assert not _in(found, wall), f"{path} imports {sorted(_in(found, wall))}"


@pytest.mark.parametrize("path", [p for p in MODULES if "rules" in p.relative_to(PKG).parts[:1]], ids=str)
def test_rules_import_no_engine(path):
    found = imports(path)
    for wall in ("localssl.engine", "localssl.builder", "localssl.reports", "localssl.evaluation"):
        assert not _in(found, wall), f"{path} imports {sorted(_in(found, wall))}"


def test_losses_see_no_optimizer_config_or_logger():
    found = imports(PKG / "rules" / "losses.py")
    allowed = ("localssl.models.layers", "localssl.registry")
    assert all(n.startswith(allowed) for n in found), found


def test_no_import_cycle_at_import_time():
    graph: dict[str, set[str]] = {}
    names = {module_name(p) for p in MODULES}
    for p in MODULES:
        graph[module_name(p)] = {n for n in imports(p, top_level_only=True) if n in names}
    state: dict[str, int] = {}

    def visit(n: str, stack: list[str]) -> None:
        state[n] = 1
        for m in sorted(graph.get(n, ())):
            # A package importing its own submodules, and those importing siblings, is how packages are built.
            if m == n or m.startswith(n + ".") or n.startswith(m + "."):
                continue
            if state.get(m) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
            if m not in state:
                visit(m, stack + [m])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])


def _docstrings(tree: ast.AST) -> set[int]:
    """The ids of the docstring constants of a module and its classes and functions."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


#: Literals that may stay, by the class and field that hold them, and why. `TrainConfig.rule`'s default is what
#: `localssl train` trains without --rule; config cannot read it from rules/ (rules import config, so config
#: importing rules would be an import cycle).
NAMED_DEFAULTS = {("TrainConfig", "rule")}


def _named_defaults(tree: ast.AST) -> set[int]:
    out = set()
    for cls in ast.walk(tree):
        if isinstance(cls, ast.ClassDef):
            for node in cls.body:
                if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                        and (cls.name, node.target.id) in NAMED_DEFAULTS and node.value is not None):
                    out |= {id(n) for n in ast.walk(node.value)}
    return out


def test_no_rule_name_outside_rules():
    """No string constant of a module outside ``localssl/rules/`` is a registered rule's name or a variant label
    of one (``clapp++@b_rank=64``, `localssl.rules.split_variant`). Docstrings may name rules in prose; code may
    not: what a report or the bench needs of a rule (its BP twin, its locality, its parameters, the figures' rule
    lists and targets, `localssl.rules.figures`) comes from ``rules/``."""
    from localssl.rules import RULES
    from localssl.rules.registry import VARIANT_SEP

    names = set(RULES.names())
    found = []
    for path in MODULES:
        if path.relative_to(PKG).parts[0] == "rules":
            continue
        tree = ast.parse(path.read_text())
        allowed = _docstrings(tree) | _named_defaults(tree)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in allowed
                    and node.value.partition(VARIANT_SEP)[0] in names):
                found.append(f"{path.relative_to(PKG.parent)}:{node.lineno}: {node.value!r}")
    assert not found, "rule names outside localssl/rules/:\n" + "\n".join(found)
