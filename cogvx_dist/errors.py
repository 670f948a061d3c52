"""User-facing errors.

A `CogvxError` is a mistake the user can fix (bad path, bad config, wrong checkpoint). The CLI prints its message
as one line and exits with status 2 instead of showing a stack trace.
"""


class CogvxError(Exception):
    """A problem with the user's input or configuration, reported as a single line."""
