"""One owner for each store's tables, one place for each word of the shared vocabulary.

Scans the source (``trinity/``, ``bus/``, ``agents/``, ``controller/``; tests may use
literals) for:

- SQL naming a store's table outside the store's own module: every table the stores
  declare (``trinity.stores.schema``) belongs to one owner, and only the owner writes
  SQL on it; everyone else calls the owner's functions;
- a pattern label, an outcome or a process name written as a literal instead of the
  contract's constant (``trinity.contract``);
- a test-plan target or limit written as a literal instead of ``trinity.plan``'s: the
  target texts the reports print, constants named like a target or limit holding a plan
  figure, and comparisons of a measured figure against a plan figure.

Each finding names the file, the line and what to use instead.
"""

from __future__ import annotations

import ast
import importlib
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from trinity import contract, plan
from trinity.stores import schema

ROOT = Path(__file__).resolve().parents[2]
SOURCE_DIRS = ("trinity", "bus", "agents", "controller")
# Where each store's tables may be named in SQL (a module, or every module of a package).
OWNERS = {
    "trinity.stores.journal": ("trinity/stores/journal.py",),
    "trinity.stores.runs": ("trinity/stores/runs.py",),
    "trinity.stores.costs": ("trinity/stores/costs.py",),
    "trinity.stores.patterns": ("trinity/stores/patterns/",),
}
# Where the vocabulary may be spelled out.
VOCABULARY_HOMES = ("trinity/contract/", "trinity/plan.py")
SQL_TABLE = re.compile(r"\b(?:FROM|INTO|UPDATE|JOIN|TABLE(?: IF NOT EXISTS)?|INDEX"
                       r"(?: IF NOT EXISTS)? \w+ ON)\s+[\"']?(\w+)")


def source_files() -> Iterator[Path]:
    for folder in SOURCE_DIRS:
        yield from sorted((ROOT / folder).rglob("*.py"))


def relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def strings(tree: ast.AST) -> Iterator[ast.Constant]:
    """Every string constant but docstrings (prose about the code is not code)."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                and id(node) not in docstrings):
            yield node


def parsed() -> Iterator[tuple[str, ast.AST]]:
    for path in source_files():
        yield relative(path), ast.parse(path.read_text(encoding="utf-8"), str(path))


def declared_tables() -> dict[str, str]:
    """Table name -> the store module that declares it."""
    tables: dict[str, str] = {}
    for store in schema.STORES:
        for name in schema.metadata_of(importlib.import_module(store)).tables:
            assert name not in tables, f"{name} is declared by {tables.get(name)} and {store}"
            tables[name] = store
    return tables


def test_every_store_is_owned_by_a_module() -> None:
    assert set(OWNERS) == set(schema.STORES)


def test_no_table_is_named_in_sql_outside_its_store() -> None:
    tables = declared_tables()
    found = []
    for path, tree in parsed():
        for node in strings(tree):
            for table in SQL_TABLE.findall(node.value):
                owner = tables.get(table)
                if owner is not None and not path.startswith(OWNERS[owner]):
                    found.append(f"{path}:{node.lineno}: SQL on {table!r}, a table of {owner}:"
                                 f" read or write it through {owner}'s functions")
    assert not found, "\n".join(found)


VOCABULARY = {
    **{label: f"trinity.contract: {name}" for name, label in (
        ("CRITICAL_ERROR", contract.CRITICAL_ERROR),
        ("CONSTITUTION_VIOLATION", contract.CONSTITUTION_VIOLATION),
        ("FEATURE_REQUEST", contract.FEATURE_REQUEST), ("DUPLICATION", contract.DUPLICATION),
        ("FLAKY_TEST", contract.FLAKY_TEST), ("NONE", contract.NONE))},
    **{name: f"trinity.contract: {name.upper()}" for name in contract.PROCESSES},
    contract.CRASHWATCH: "trinity.contract: CRASHWATCH",
    contract.MODELS: "trinity.contract: MODELS",
    contract.NO_PATTERN: "trinity.contract: NO_PATTERN",
    contract.PLAN_FAILED: "trinity.contract: PLAN_FAILED",
    **{stream: "trinity.contract's stream names" for stream in contract.TOPOLOGY.streams},
}
QUOTED = re.compile(r"'(\w+)'")
# Keyword arguments whose values are another library's words (matplotlib's "none").
FOREIGN_KEYWORDS = frozenset({"linestyle"})


def test_labels_process_names_and_streams_are_spelled_only_in_the_contract() -> None:
    found = []
    for path, tree in parsed():
        if path.startswith(VOCABULARY_HOMES):
            continue
        foreign = {id(k.value) for k in ast.walk(tree)
                   if isinstance(k, ast.keyword) and k.arg in FOREIGN_KEYWORDS}
        for node in strings(tree):
            if id(node) in foreign:
                continue
            words = {node.value} | set(QUOTED.findall(node.value))  # a name quoted in SQL too
            for word in words & set(VOCABULARY):
                found.append(f"{path}:{node.lineno}: {word!r} written out; use "
                             f"{VOCABULARY[word]}")
    assert not found, "\n".join(found)


PLAN_FIGURES = {value for value in (
    plan.BACKLOG_LIMIT, plan.MEMORY_LIMIT_MB, plan.MEMORY_GROWTH_PCT_PER_HOUR,
    plan.DETECTION_RATE_MIN, plan.COST_SPIKE_USD_PER_HOUR, plan.ACCURACY_TARGET,
    plan.LATENCY_TARGET_S, plan.CONFIDENCE_TARGET, plan.LOCAL_SHARE_TARGET,
    plan.COST_PER_24H_USD, plan.LONG_RUN_ACCURACY, plan.LEARNING_PER_WEEK,
    plan.MEMORY_TOTAL_MB)}
TARGET_NAME = re.compile(r"(TARGET|LIMIT|_MIN$|_MAX$)")
MEASURED = re.compile(r"(accuracy|latency|confidence|local|share|backlog|rss|memory|growth|"
                      r"detection_rate|spent|cost|pending)", re.I)


def _number(node: ast.AST) -> float | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(
            node.value, bool):
        return float(node.value)
    return None


def test_plan_targets_are_written_only_in_the_plan() -> None:
    texts = {target.text for target in plan.CRITERIA if "{" not in target.text}
    found = []
    for path, tree in parsed():
        if path.startswith(VOCABULARY_HOMES):
            continue
        for node in strings(tree):
            for text in texts:
                if text in node.value:
                    found.append(f"{path}:{node.lineno}: the plan's target text {text!r}; "
                                 "use the Target in trinity.plan")
        source = ast.get_source_segment
        text_of = (ROOT / path).read_text(encoding="utf-8")
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and _number(node.value) in PLAN_FIGURES:
                names = [t.id for t in node.targets if isinstance(t, ast.Name)]
                if any(TARGET_NAME.search(name) for name in names):
                    found.append(f"{path}:{node.lineno}: {names[0]} holds a plan figure; "
                                 "use trinity.plan's")
            if isinstance(node, ast.Compare):
                operands = [node.left, *node.comparators]
                figures = [n for n in operands if _number(n) in PLAN_FIGURES]
                others = [source(text_of, n) or "" for n in operands if _number(n) is None]
                if figures and any(MEASURED.search(o) for o in others):
                    found.append(f"{path}:{node.lineno}: a measured figure compared with "
                                 f"{_number(figures[0])}; use trinity.plan's target")
    assert not found, "\n".join(found)


@pytest.mark.parametrize("module", ["trinity.bus.journal", "trinity.bus.node",
                                    "trinity.bus.process", "trinity.bus.config"])
def test_the_bus_knows_no_process_names(module: str) -> None:
    """The bus takes its topology from whoever starts it: it imports no name from the
    contract but the Topology type."""
    path = ROOT / "bus" / f"{module.rsplit('.', 1)[1]}.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "trinity.contract":
            assert {a.name for a in node.names} <= {"Topology"}, f"{module}:{node.lineno}"
