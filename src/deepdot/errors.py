"""Errors that deepdot reports to a person as one line (the CLI turns them into exit code 2)."""


class DeepdotError(Exception):
    """A problem with the user's input or set-up, described in one line.

    The message should name the file concerned and what is wrong with it, so the CLI can print it
    without a traceback. The library's messages describe the problem, not command-line flags:
    ``settings`` names the settings that would change the outcome (``"preprocess"``,
    ``"layer"``…) and the command line adds its own spelling of them.
    """

    def __init__(self, message: str = "", *, settings: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.settings = settings


class DataError(DeepdotError):
    """A data set could not be read or does not fit (shape, labels, emptiness)."""


class ModelError(DeepdotError):
    """A model file could not be read, is unsafe to read, or does not fit the data."""


def describe(exc: BaseException) -> str:
    """The first line of an exception's message (or its type name), short enough for one line."""
    text = str(exc).strip()
    text = text.splitlines()[0] if text else type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
