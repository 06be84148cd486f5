"""The one base class of every error Flywheel raises for a person to read.

Each stage defines its own subclasses next to the code that raises them (ConfigError in config,
SourceError in data.sources, ...); the CLI catches `FlywheelError` once and prints the message,
which says what was wrong, where, and what to do.
"""

from __future__ import annotations


class FlywheelError(RuntimeError):
    """A failure a user can act on; the message names the cause and the fix."""

    exit_code = 1  # what the `flywheel` command exits with


class InvalidArgument(FlywheelError, ValueError):
    """An argument of a use case (a command's option) that cannot be used; the message names it."""

    exit_code = 2  # a usage error, as for an option the command line itself refuses


class PipelineError(FlywheelError):
    """A step of the loop could not complete; the message says which and why."""


class AliasConflict(FlywheelError):
    """An alias move lost its compare-and-set: the alias is no longer where the mover expected."""
