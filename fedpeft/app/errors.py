"""How the command line reports errors: expected ones in a line (exit 2), anything else with where it was raised
and where its traceback went (exit 1)."""

from __future__ import annotations

import functools
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import click
import typer
from rich.console import Console
from rich.markup import escape

console = Console(stderr=True)


class Command:
    """What the error handler needs to know about the command that is running."""

    verbose = False
    run_dir: Optional[Path] = None


current = Command()  # one command runs per process


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn an unexpected exception into a few lines naming it, where it was raised and where its traceback is."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        current.verbose, current.run_dir = bool(kwargs.get("verbose", False)), None
        try:
            return fn(*args, **kwargs)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, KeyboardInterrupt):
            raise
        except Exception as err:  # anything else is a bug or an environment problem: say what and where
            exit_unexpected(err, logged=False)

    return wrapper


def exit_unexpected(err: BaseException, logged: bool) -> None:
    """Print an unexpected error in a few lines (the whole traceback with --verbose) and exit 1.

    `logged`: the traceback is already in the run's run.log (the simulation driver wrote it).
    """
    from fedpeft.app.runlog import error_text, origin, write_traceback

    run_dir = current.run_dir
    if run_dir is not None and run_dir.is_dir():
        log = run_dir / "run.log"
        if not logged:
            write_traceback(log, err, header=f"fedpeft {' '.join(sys.argv[1:])}: unexpected error")
    else:
        fd, name = tempfile.mkstemp(prefix="fedpeft-error-", suffix=".log")
        with open(fd, "w", encoding="utf-8") as f:
            f.write(f"fedpeft {' '.join(sys.argv[1:])}\n")
        log = Path(name)
        write_traceback(log, err)
    if current.verbose:
        console.print("".join(traceback.format_exception(err)).rstrip(), markup=False, highlight=False, soft_wrap=True)
    console.print(f"[red]error:[/red] unexpected {escape(error_text(err, max_lines=3, max_chars=300))}", highlight=False, soft_wrap=True)
    console.print(f"  raised at {escape(origin(err))}", highlight=False, soft_wrap=True)
    hint = "" if current.verbose else " (--verbose prints it here)"
    console.print(f"  full traceback: {escape(str(log))}{hint}", highlight=False, soft_wrap=True)
    if run_dir is not None and _marked_failed(run_dir):
        console.print(f"  the run directory is marked failed: {escape(str(run_dir))}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def _marked_failed(run_dir: Path) -> bool:
    from fedpeft.rundir import read_status

    return read_status(run_dir).get("status") == "failed"


def exit_expected(err: object) -> None:
    """Print an error the user can act on (config, data, model, deployment) and exit 2."""
    console.print(f"[red]error:[/red] {escape(str(err))}", highlight=False, soft_wrap=True)
    if current.run_dir is not None and _marked_failed(current.run_dir):
        console.print(f"  the run directory is marked failed: {escape(str(current.run_dir))} (log: run.log)",
                      highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def started(path: Path) -> None:
    """Record the run directory of the command that is running, once the simulation has made it."""
    current.run_dir = Path(path)


def run_failed(failure: BaseException | None, label: str = "") -> None:
    """Report a simulation's error (if any) and exit: 2 for an expected one, 1 for anything else."""
    from fedpeft.config import ConfigError
    from fedpeft.data import DataError
    from fedpeft.models import ModelLoadError
    from fedpeft.app.server.resume import ResumeError

    if failure is None:
        return
    if isinstance(failure, (ConfigError, DataError, ModelLoadError, ResumeError)):
        exit_expected(f"{label}{failure}")
    if isinstance(failure, Exception):
        exit_unexpected(failure, logged=current.run_dir is not None)
    raise failure
