"""The `flywheel` command: a thin layer over `flywheel.api`. Each command parses its options, makes
one API call and renders what comes back (`render`); `common.command` maps failures to messages
and exit codes once for all. One module per group of commands:

- `models`: init, ingest, train, import, evaluate, promote, rollback, abort-rollout, status, card
- `serving`: serve, room, predict, log export|prune, image build
- `loop`: demo, example, replay, monitor, retrain, step, run
- `llm`: finetune, export, publish (LoRA projects)
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from flywheel.cli import llm, loop, models, serving
from flywheel.cli.common import out

app = typer.Typer(
    help="Flywheel: train (or LoRA fine-tune), register, serve, monitor, retrain and promote a model "
         "from one config file.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish, PowerShell
)


def _version(show: bool) -> None:
    if show:
        from importlib.metadata import version

        out.print(f"flywheel {version('mlflywheel')} (Python {sys.version.split()[0]})")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    pass


# --help lists the commands in this order: the loop first, as a newcomer meets it
loop.register(app)
models.register(app)
serving.register(app)
llm.register(app)

__all__ = ["app"]
