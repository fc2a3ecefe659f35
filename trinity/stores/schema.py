"""The stores' DDL, generated from their SQLAlchemy declarations.

Each store module declares its tables once, with SQLAlchemy Core (its ``declare``), and
carries what that declaration compiles to for SQLite in a generated block: ``DDL``, and
each table's column definitions, ``COLUMNS``, from which a store made before a column
was declared gets it added on open (``trinity.db.create_schema``). The processes create
and open their stores with those and never import SQLAlchemy: its import costs ~19 MB of
private memory in every process, and four long-lived processes are held to 400 MB
together (``make bench-24h``). This module is the generator (``make schema``, or
``python -m trinity.stores.schema [--check]``), and the test suite fails when a block
differs from what its declaration compiles to.
"""

from __future__ import annotations

import importlib
import json
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sqlalchemy import MetaData

# The stores whose tables are declared, by module.
STORES = ("trinity.stores.journal", "trinity.stores.runs", "trinity.stores.costs",
          "trinity.stores.patterns")
BEGIN = "# -- schema: generated from declare() by `make schema`; a test keeps it current --"
END = "# -- end of generated schema --"
_WIDTH = 92


def metadata_of(store: ModuleType) -> MetaData:
    """The store's declared tables as a SQLAlchemy ``MetaData``."""
    from sqlalchemy import MetaData

    metadata = MetaData()
    store.declare(metadata)
    return metadata


def compile_ddl(store: ModuleType) -> tuple[str, ...]:
    """``CREATE TABLE IF NOT EXISTS`` and ``CREATE INDEX IF NOT EXISTS`` statements for
    the store's tables, in declaration order, one line each."""
    from sqlalchemy.dialects import sqlite
    from sqlalchemy.schema import CreateIndex, CreateTable

    dialect = sqlite.dialect()
    found = []
    for table in metadata_of(store).tables.values():
        found.append(str(CreateTable(table, if_not_exists=True).compile(dialect=dialect)))
        for index in sorted(table.indexes, key=lambda i: str(i.name)):
            found.append(str(CreateIndex(index, if_not_exists=True).compile(dialect=dialect)))
    return tuple(" ".join(statement.split()).replace("( ", "(").replace(" )", ")")
                 for statement in found)


def compile_columns(store: ModuleType) -> dict[str, tuple[str, ...]]:
    """Each table's column definitions (``name TYPE [NOT NULL] [DEFAULT ...]``), in order:
    what ``trinity.db.create_schema`` adds to a store made before a column existed."""
    from sqlalchemy.dialects import sqlite
    from sqlalchemy.schema import CreateColumn

    dialect = sqlite.dialect()
    return {table.name: tuple(" ".join(str(CreateColumn(column).compile(dialect=dialect)).split())
                              for column in table.columns)
            for table in metadata_of(store).tables.values()}


def _literal(statement: str) -> list[str]:
    """A statement as Python string literals of at most ~_WIDTH characters, split at spaces."""
    pieces: list[str] = []
    line = ""
    for word in statement.split(" "):
        candidate = f"{line} {word}" if line else word
        if len(candidate) > _WIDTH - 10 and line:
            pieces.append(line + " ")
            line = word
        else:
            line = candidate
    pieces.append(line)
    return [json.dumps(piece) for piece in pieces]


def render_block(ddl: tuple[str, ...], columns: dict[str, tuple[str, ...]]) -> str:
    lines = [BEGIN, "DDL = ("]
    for statement in ddl:
        literals = _literal(statement)
        lines.append(f"    {literals[0]}")
        lines += [f"    {lit}" for lit in literals[1:]]
        lines[-1] += ","
    lines += [")", "# Each table's columns: a store made before one existed gets it on open.",
              "COLUMNS = {"]
    for table, definitions in columns.items():
        lines.append(f"    {json.dumps(table)}: (")
        lines += [f"        {json.dumps(definition)}," for definition in definitions]
        lines.append("    ),")
    lines += ["}", END]
    return "\n".join(lines)


_BLOCK = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)


def source_with_block(store: ModuleType) -> tuple[Path, str, str]:
    """(the store's file, its text now, its text with the block regenerated)."""
    path = Path(store.__file__ or "")
    text = path.read_text(encoding="utf-8")
    if not _BLOCK.search(text):
        raise SystemExit(f"{path}: no generated schema block ({BEGIN!r} ... {END!r})")
    block = render_block(compile_ddl(store), compile_columns(store))
    return path, text, _BLOCK.sub(lambda _: block, text, count=1)


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for name in STORES:
        path, text, regenerated = source_with_block(importlib.import_module(name))
        if regenerated == text:
            continue
        stale.append(path)
        if not check:
            path.write_text(regenerated, encoding="utf-8")
            print(f"wrote the schema block of {path}")
    if check and stale:
        print("stale schema blocks (run `make schema`): " + ", ".join(map(str, stale)))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
