"""Each store's DDL is what its SQLAlchemy declaration compiles to, and its statements fit
its tables."""

from __future__ import annotations

import importlib
import re
import sqlite3
import subprocess
import sys

import pytest

from trinity.stores import journal, schema

SQL = re.compile(r"^\s*(SELECT|INSERT|UPDATE|DELETE)\b")


@pytest.mark.parametrize("store", schema.STORES)
def test_the_generated_ddl_is_the_declaration_compiled(store: str) -> None:
    module = importlib.import_module(store)
    assert schema.compile_ddl(module) == module.DDL, "run `make schema`"
    _, text, regenerated = schema.source_with_block(module)
    assert regenerated == text


def test_the_check_fails_on_a_stale_block(monkeypatch: pytest.MonkeyPatch) -> None:
    assert schema.main(["--check"]) == 0
    monkeypatch.setattr(journal, "declare", lambda metadata: None)  # the tables are gone
    assert schema.main(["--check"]) == 1


@pytest.mark.parametrize("store", schema.STORES)
def test_each_statement_of_the_store_fits_its_tables(store: str) -> None:
    module = importlib.import_module(store)
    db = sqlite3.connect(":memory:")
    for ddl in module.DDL:
        db.execute(ddl)
    statements = [value for value in vars(module).values()
                  if isinstance(value, str) and SQL.match(value)]
    if store == "trinity.stores.journal":
        statements.append(journal.journaled_ids_query(3))
    for statement in statements:
        db.execute(f"EXPLAIN {statement}", (None,) * statement.count("?"))


def test_the_processes_never_import_sqlalchemy() -> None:
    """Its import costs ~19 MB in each long-lived process: the stores only declare with it."""
    code = ("import sys\n"
            "import trinity.agents.witness.process, trinity.agents.architect\n"
            "import trinity.agents.executor, trinity.controller.process.controller\n"
            "import trinity.controller.supervision.crashwatch\n"
            "print('sqlalchemy' in sys.modules)")
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=120)
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == "False"
