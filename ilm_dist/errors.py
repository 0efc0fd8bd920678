"""The one kind of error a user can fix: bad input (a file, a key, a value), and the one way it ends a command.

Every module raises a subclass of :class:`InputError` whose message names the file, key or value and what
was expected; every command-line entry point turns it into one line ``error: <message>`` on stderr and
exit status 2 (:func:`exit_on_input_error`), on every rank of a distributed job.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NoReturn, TypeVar

T = TypeVar("T")

EXIT_INPUT_ERROR = 2  # like argparse's usage errors


class InputError(ValueError):
    """Bad user input; the message names the file, key or value and what was expected."""


class ConfigError(InputError):
    """A run configuration is invalid; the message names the key."""


def fail(message: str) -> NoReturn:
    """Print ``error: <message>`` and exit with status 2."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_INPUT_ERROR)


@contextmanager
def exit_on_input_error() -> Iterator[None]:
    """Turn an :class:`InputError` raised inside the block into ``error: ...`` and exit status 2."""
    try:
        yield
    except InputError as err:
        fail(str(err))


def run_cli(main: Callable[[], T]) -> T:
    """``main()`` with :class:`InputError` turned into ``error: ...`` and exit status 2."""
    with exit_on_input_error():
        return main()


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose usage errors are one line, ``error: <prog>: <message>``, exit 2."""

    def error(self, message: str) -> NoReturn:
        fail(f"{self.prog}: {message} (see --help)")
