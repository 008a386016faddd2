"""`dpruner methods`: the pruning methods, criteria and allocations, one line each with what each needs."""

from __future__ import annotations

from rich.table import Table

from dpruner.cli.errors import handle_errors
from dpruner.cli.options import JsonOpt
from dpruner.cli.output import emit_json, stdout_console

HELP = "List the pruning methods (--method), channel criteria (--criterion) and allocations (--allocation), with what each needs."
SCHEMA_VERSION = 1


@handle_errors
def methods(json_output: JsonOpt = False) -> None:
    """Print the catalog as a table, or as JSON with --json."""
    from dpruner.methods.catalog import catalog

    doc = {"schema": SCHEMA_VERSION, **catalog()}
    if json_output:
        emit_json(doc)
        return
    out = stdout_console()
    for title, key, column in (("Methods (--method)", "methods", "how"), ("Criteria (--criterion)", "criteria", None),
                               ("Allocations (--allocation)", "allocations", None)):
        table = Table(title=title, title_justify="left")
        table.add_column("name")
        if column:
            table.add_column("how")
        table.add_column("what it does")
        table.add_column("needs")
        for item in doc[key]:
            row = [item["name"], *([item[column]] if column else []), item["summary"], ", ".join(item["needs"])]
            table.add_row(*row)
        out.print(table)
