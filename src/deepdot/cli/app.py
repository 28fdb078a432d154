"""The command line's plumbing: the Typer app, the consoles, and the one place where failures
become exit codes (a contract scripts and CI gates rely on):

    0   success; for ``scan``: no backdoor found
    1   ``scan``: backdoor found (``filter``: inputs flagged) -- and nothing else
    2   usage or input error, or any other failure (one line on stderr; ``--debug`` shows tracebacks)
    3   ``mitigate``: the repair is not within its budget (``within_budget: false`` in mitigation.json)
    130 interrupted (Ctrl-C); 143 terminated (SIGTERM). A scan resumes when rerun.
"""

from __future__ import annotations

import functools
import signal
import sys
import warnings
from collections.abc import Callable
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.text import Text

from deepdot import __version__
from deepdot.errors import DeepdotError

app = typer.Typer(
    name="deepdot",
    help="Find, explain and remove backdoors in image classifiers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

EXIT_CLEAN, EXIT_BACKDOOR, EXIT_INPUT, EXIT_NOT_REPAIRED = 0, 1, 2, 3
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143
_state = {"debug": False}

F = TypeVar("F", bound=Callable[..., Any])


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is so that it stops like Ctrl-C does (checkpoint kept)."""


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated


def fail(message: str) -> NoReturn:
    """Print one error line on stderr and exit with code 2 (input or usage error)."""
    one_line = " ".join(message.split())  # a file name may hold a newline
    err_console.print(Text.assemble(("error:", "bold red"), " ", one_line), highlight=False, soft_wrap=True)
    raise typer.Exit(EXIT_INPUT)


def _describe_crash(exc: BaseException) -> str:
    """One line for an exception deepdot did not expect: a bug, or a resource running out."""
    detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    what = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    if isinstance(exc, MemoryError):
        return f"out of memory ({what}); try fewer images (--max-images) or a smaller model"
    if isinstance(exc, OSError):
        return f"{what}"
    return f"internal error ({what}); this is a bug in deepdot: rerun as `deepdot --debug ...` for the traceback and report it"


#: the command-line spelling of the settings a library error names (DeepdotError.settings)
FLAGS = {
    "preprocess": "--preprocess",
    "min_clean_accuracy": "--min-accuracy",
    "layer": "--layer",
    "method": "--method",
    "arch": "--arch",
    "allow_code": "--allow-code",
    "labels": "--labels",
}


def _flags_for(exc: BaseException) -> str:
    """`` (options: --a, --b)`` for the settings named by ``exc`` or the errors it wraps."""
    names: list[str] = []
    seen: BaseException | None = exc
    while seen is not None:
        names += [FLAGS[s] for s in getattr(seen, "settings", ()) if s in FLAGS and FLAGS[s] not in names]
        seen = seen.__cause__
    return f" (options: {', '.join(names)})" if names else ""


def handle_errors(func: F) -> F:
    """The one place where a command's failures become exit codes, so that exit 1 stays the
    verdict "backdoor found" and nothing else:

    * :class:`DeepdotError` (bad input or set-up) -> its one-line message, exit 2;
    * Ctrl-C -> exit 130, SIGTERM -> exit 143 (a scan keeps its checkpoint and resumes);
    * any other exception (a bug in deepdot, or memory running out) -> one line saying so,
      exit 2. ``deepdot --debug`` shows the traceback instead.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except SystemExit as exc:  # from a library (rich exits 1 when stdout is a closed pipe): never a verdict
            if exc.code in (0, None):
                raise
            raise typer.Exit(EXIT_INPUT) from None
        except KeyboardInterrupt as exc:
            code = EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED
            how = "terminated" if code == EXIT_TERMINATED else "interrupted"
            err_console.print(f"{how}; a scan rerun with the same arguments resumes where it stopped")
            raise typer.Exit(code) from None
        except DeepdotError as exc:
            if _state["debug"]:
                raise
            fail(str(exc) + _flags_for(exc))
        except Exception as exc:  # noqa: BLE001 - the structural net: never a traceback, never exit 1
            if _state["debug"]:
                raise
            fail(_describe_crash(exc))

    return wrapper  # type: ignore[return-value]


def _version(value: bool) -> None:
    if value:
        console.print(f"deepdot {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    _state["debug"] = debug
    if not debug:
        # Third-party notices (torch's pickle protocol, Pillow's decompression-bomb warning, …)
        # are not for the user: deepdot checks what they warn about and says so itself.
        warnings.simplefilter("ignore")


def main(argv: list[str] | None = None) -> None:
    """The ``deepdot`` console script."""
    sys.exit(run(sys.argv[1:] if argv is None else argv))


def run(args: list[str]) -> int:
    """Run the command line on ``args`` and return its exit code.

    Usage errors (an unknown option, a bad value) are one line here too, like every other
    error: the command's failures are handled by :func:`handle_errors`, the parser's here.
    """
    from typer import _click

    signal.signal(signal.SIGTERM, _terminate)
    command = typer.main.get_command(app)
    try:
        result = command.main(args=args, prog_name="deepdot", standalone_mode=False)
    except _click.exceptions.NoArgsIsHelpError as exc:
        console.print(exc.ctx.get_help() if exc.ctx else "", markup=False, highlight=False)
        return EXIT_INPUT
    except _click.exceptions.UsageError as exc:
        where = (
            f"deepdot {exc.ctx.command_path.split(' ', 1)[1]}" if exc.ctx and " " in exc.ctx.command_path else "deepdot"
        )
        return _one_line(f"{exc.format_message()} (see `{where} --help`)")
    except _click.exceptions.ClickException as exc:
        return _one_line(exc.format_message())
    except (typer.Abort, EOFError):
        err_console.print("aborted")
        return EXIT_INTERRUPTED
    except KeyboardInterrupt as exc:  # raised outside a command (while parsing or importing)
        return EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_INPUT
    return result if isinstance(result, int) else EXIT_CLEAN


def _one_line(message: str) -> int:
    try:
        fail(" ".join(message.split()))
    except typer.Exit as done:
        return done.exit_code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
