"""The ``deepdot`` command line: thin commands over the library.

Each module holds one group of commands; they parse their options, call one entry point of the
library, print through :mod:`deepdot.report` and map the result to an exit code
(:mod:`deepdot.cli.app`). Importing this package registers every command on :data:`app`.
"""

# isort: off
# the commands, registered in the order `deepdot --help` lists them
from deepdot.cli import train  # noqa: F401
from deepdot.cli import scan  # noqa: F401
from deepdot.cli import demo  # noqa: F401
from deepdot.cli import mitigate  # noqa: F401

# isort: on
from deepdot.cli.app import (
    EXIT_BACKDOOR,
    EXIT_CLEAN,
    EXIT_INPUT,
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    app,
    handle_errors,
    main,
    run,
)

__all__ = [
    "EXIT_BACKDOOR",
    "EXIT_CLEAN",
    "EXIT_INPUT",
    "EXIT_INTERRUPTED",
    "EXIT_TERMINATED",
    "app",
    "handle_errors",
    "main",
    "run",
]
