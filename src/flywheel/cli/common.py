"""What every command shares: the consoles, the --config option, the one decorator that maps
failures to messages and exit codes, and the progress display."""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)

from flywheel.config import ConfigError
from flywheel.core.errors import FlywheelError
from flywheel.core.extras import missing_extra
from flywheel.core.jsonable import dumps
from flywheel.core.progress import Advance
from flywheel.core.secrets import redact

console = Console(stderr=True)  # progress, narration and errors
out = Console()  # results

DEFAULT_CONFIG = Path("examples/sba-loans/flywheel.yaml")
ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="Path to the project's flywheel.yaml.")]
AtOpt = Annotated[str | None, typer.Option("--at", help=(
    "The pipeline's clock: YYYY-MM-DD, or 'data' (the day after the latest row it could learn "
    "from); default by retraining.clock (today)."))]

F = TypeVar("F", bound=Callable[..., Any])


def command(group: typer.Typer, name: str | None = None) -> Callable[[F], F]:
    """Register a command on `group`; a known failure it raises prints one clear line (no
    traceback) and exits with the error's `exit_code` (1; 2 for an argument it cannot use or a bad
    config), a missing optional extra names what to install."""

    def register(fn: F) -> F:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            with failures():
                return fn(*args, **kwargs)

        group.command(name)(run)
        return fn

    return register


@contextlib.contextmanager
def failures() -> Iterator[None]:
    try:
        yield
    except ConfigError as exc:
        console.print(f"[red]config error[/]\n{escape(str(exc))}")
        raise typer.Exit(2) from None
    except FlywheelError as exc:
        console.print(f"[red]error:[/] {escape(redact(str(exc)))}")  # messages may hold [brackets]
        raise typer.Exit(exc.exit_code) from None
    except ModuleNotFoundError as exc:  # a library of an extra that is not installed
        missing = missing_extra(exc)
        if missing is None:
            raise
        console.print(f"[red]error:[/] {escape(str(missing))}")
        raise typer.Exit(1) from None


def print_json(result: Any) -> None:
    """A result on stdout as JSON, by the one rule of `flywheel.core.jsonable`."""
    sys.stdout.write(dumps(result) + "\n")


def say(message: str) -> None:
    """A line of narration from a long command (stderr, beside the progress)."""
    console.print(message)


def parse_date(text: str, option: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError as exc:
        raise typer.BadParameter(f"{text!r} is not a date YYYY-MM-DD ({exc})", param_hint=option) from None


def clock(text: str | None) -> date | Literal["data"] | None:
    """The --at option: a day, 'data', or none (by retraining.clock)."""
    if not text:
        return None
    return "data" if text == "data" else parse_date(text, "--at")


class RichReporter:
    """Shows each step as a line with a spinner or a bar, and a tick with its time when done."""

    def __init__(self, progress: Progress):
        self.progress = progress

    @contextlib.contextmanager
    def step(self, name: str, total: int | None = None) -> Iterator[Advance]:
        task = self.progress.add_task(name, total=total)

        def advance(done: int, of: int) -> None:
            self.progress.update(task, completed=done, total=of)

        try:
            yield advance
        except BaseException:
            self.progress.update(task, description=f"[red]✗ {name}")
            raise
        self.progress.update(task, description=f"[green]✓[/] {name}", completed=total or 1,
                             total=total or 1)


@contextlib.contextmanager
def reporter() -> Iterator[RichReporter]:
    columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=16),
               TaskProgressColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=console, transient=False) as progress:
        yield RichReporter(progress)
