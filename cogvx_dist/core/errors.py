"""User-facing errors.

A `CogvxError` is a mistake the user can fix (bad path, bad config, wrong checkpoint). The CLI prints its message
as one line and exits with status 2 instead of showing a stack trace.
"""


class CogvxError(Exception):
    """A problem with the user's input or configuration, reported as a single line."""


def first_line(err: BaseException) -> str:
    """The first non-empty line of an exception's message (or its type name): library errors can span pages."""
    for line in str(err).splitlines():
        if line.strip():
            return line.strip()
    return type(err).__name__


class RankError(CogvxError):
    """A problem that may hold on some ranks only (e.g. adapters that differ); every rank reports it with its rank."""
