"""`invoke`: run the dpruner CLI in this process (no interpreter start-up, torch imported once), with the exit code,
stdout and stderr it produced; an exception escaping main() fails the test with its traceback, as it should."""

from __future__ import annotations

import io
import os
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str

    def one_error_line(self) -> str:
        """stderr's error sentence; fails unless stderr is exactly one 'error: ...' line (plus a usage hint)."""
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        assert lines and lines[0].startswith(("error: ", "internal error: ")), self.stderr
        assert len(lines) == 1 or (len(lines) == 2 and lines[1].startswith("usage: ")), self.stderr
        return lines[0]


def invoke(*args: str, cwd: str | os.PathLike | None = None) -> Run:
    from dpruner.cli.app import main

    out, err = io.StringIO(), io.StringIO()
    before = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                main([str(a) for a in args])
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        os.chdir(before)
    return Run(code, out.getvalue(), err.getvalue())
