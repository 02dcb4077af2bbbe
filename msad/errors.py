"""The one error type for mistakes a user can fix (bad file, bad key, bad value).

The CLI prints its message as a single line and exits 2; every other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A user-fixable problem; the message is one line naming the file, key or value and what is allowed."""
