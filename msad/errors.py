"""The errors the CLI turns into one line: a user's mistake (exit 2) and a run that started and failed (exit 1).

Every other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A user-fixable problem; the message is one line naming the file, key or value and what is allowed."""


class RunFailedError(Exception):
    """A run that started but did not finish; the message is one line saying why, `details` the tracebacks."""

    details: str = ""
