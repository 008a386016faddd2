"""The Typer application. Command modules are imported here; torch is imported only inside command bodies."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from dpruner import __version__
from dpruner.errors import EXIT_BAD_INPUT
from dpruner.cli import analyze as analyze_cmd
from dpruner.cli import evaluate as evaluate_cmd
from dpruner.cli import export as export_cmd
from dpruner.cli import finetune as finetune_cmd
from dpruner.cli import methods as methods_cmd
from dpruner.cli import prune as prune_cmd
from dpruner.cli import report as report_cmd

app = typer.Typer(
    name="dpruner",
    help="Make trained PyTorch CNNs smaller and faster by structured (filter/channel) pruning.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command("analyze", help=analyze_cmd.HELP)(analyze_cmd.analyze)
app.command("prune", help=prune_cmd.HELP)(prune_cmd.prune)
app.command("evaluate", help=evaluate_cmd.HELP)(evaluate_cmd.evaluate)
app.command("finetune", help=finetune_cmd.HELP)(finetune_cmd.finetune)
app.command("export", help=export_cmd.HELP)(export_cmd.export)
app.command("report", help=report_cmd.HELP)(report_cmd.report)
app.command("methods", help=methods_cmd.HELP)(methods_cmd.methods)


def _version(value: bool) -> None:
    if value:
        print(f"dpruner {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = None,
) -> None:
    """Exit codes: 0 ok, 1 target not met, 2 bad input or usage, 3 verification failed (docs/exit-codes.md)."""


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point. Usage errors print like every other error: one `error:` sentence, then the
    usage line and where to get help (not Typer's boxed panel); the exit code is 2."""
    import sys

    from typer.exceptions import Abort, TyperException

    try:
        code = app(args=argv, prog_name="dpruner", standalone_mode=False)
    except TyperException as exc:  # click's UsageError and friends (Typer vendors click)
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:  # bare `dpruner`: the help, as before
            sys.stdout.write(ctx.get_help() + "\n")
            sys.exit(EXIT_BAD_INPUT)
        message = " ".join(exc.format_message().split())
        message += "" if message.endswith((".", "?", "!")) else "."
        sys.stderr.write(f"error: {message}\n")
        if ctx is not None:
            usage = " ".join(ctx.get_usage().split()).removeprefix("Usage: ")
            sys.stderr.write(f"usage: {usage}  (see '{ctx.command_path} -h')\n")
        sys.exit(getattr(exc, "exit_code", EXIT_BAD_INPUT) or EXIT_BAD_INPUT)
    except (Abort, KeyboardInterrupt):
        sys.stderr.write("error: interrupted.\n")
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
