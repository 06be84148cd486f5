"""`python -m flywheel.cli`: the `flywheel` command."""

from flywheel.cli import app

if __name__ == "__main__":  # importing it (a tool walking the package) runs nothing
    app()
