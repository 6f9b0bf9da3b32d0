"""The package's errors: one base, `Med3DError`, each kind carrying the exit code of the `med3d` command.

A `Med3DError` is something the user can act on; its message says what was wrong and what to do. Each
subclass also keeps the built-in type callers already catch (`ConfigError` is a `ValueError`,
`HubUnreachableError` a `ConnectionError`). Anything else that reaches the command line is a bug and is
reported as an internal error (see `exit_code`).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1  # some inputs failed, or a training run diverged
EXIT_USAGE = 2  # the user's input (arguments, files, configs) is wrong
EXIT_UNREACHABLE = 3  # the Hub could not be reached and nothing is cached
EXIT_PUBLISH_FAILED = 4  # an upload or its round trip failed after the checks passed
EXIT_INTERNAL = 70  # a bug in the package (EX_SOFTWARE)
EXIT_INTERRUPTED = 130  # Ctrl-C


class Med3DError(Exception):
    """An error the user can fix; the command line prints it as one line, without a traceback."""

    exit_code: int = EXIT_USAGE


class UsageError(Med3DError, ValueError):
    """A value given to the package (an argument, a flag, a field of a file) is not valid."""


class MissingFileError(Med3DError, FileNotFoundError):
    """A file or folder the user named does not exist or lacks a part."""


class UnwritableError(Med3DError, PermissionError):
    """An output cannot be written where the user asked (a read-only folder)."""


class DivergedError(Med3DError, FloatingPointError):
    """Training produced a non-finite loss: the run stops instead of writing NaN weights."""

    exit_code = EXIT_FAILED


def exit_code(err: BaseException) -> int:
    """The one table from an exception to the exit code of the `med3d` command.

    `Med3DError`: its own code. An error the operating system raised (it has an errno: no space left,
    permission denied) is the user's environment, not a bug: EXIT_USAGE. Anything else: EXIT_INTERNAL.
    """
    if isinstance(err, Med3DError):
        return err.exit_code
    if isinstance(err, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(err, OSError) and err.errno is not None:
        return EXIT_USAGE
    return EXIT_INTERNAL


def is_user_error(err: BaseException) -> bool:
    """True when `err` is reported as an error of the user's (one line, no traceback)."""
    return exit_code(err) not in (EXIT_INTERNAL, EXIT_INTERRUPTED)
