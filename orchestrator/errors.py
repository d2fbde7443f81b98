"""The project's one error type. Every failure a user can act on is an ``OrchError`` whose
message says what went wrong and how to fix it; the CLI turns it into a one-line click error in
one place (``orchestrator.cli.OrchGroup``), never a traceback.

Two questions decide how it is shown: is it a mistake in what the user asked (``usage``: exit
code 2, like click's own usage errors) or a failure of the work (exit code 1); and which option
it is about (``param``: shown as click shows a bad option).
"""

from __future__ import annotations

from contextlib import contextmanager


class OrchError(Exception):
    usage = False
    param: str | None = None

    def __init__(self, message: str, *, param: str | None = None, usage: bool | None = None):
        super().__init__(message)
        if param is not None:
            self.param = param
        if usage is not None:
            self.usage = usage


class InputError(OrchError):
    """What the user asked cannot be done as asked (a bad option, a missing run)."""

    usage = True


class SearchFailed(OrchError):
    def __init__(self, search_id: str, reason: str):
        super().__init__(f"search {search_id} failed: {reason}")
        self.search_id = search_id
        self.reason = reason


@contextmanager
def about(param: str):
    """Input errors raised inside concern option ``param`` (unless they name one already): a
    connection that fails because of ``--address`` is a bad ``--address``."""
    try:
        yield
    except InputError as e:
        if e.param is None:
            e.param = param
        raise
