"""User-facing errors.

Anything a user can cause (a malformed schedule, a missing domain, a bad flag) raises `UserError`
with a one-line message naming the problem; CLIs print it without a traceback and exit 2.
"""


class UserError(ValueError):
    """Bad input from the user: printed as one line, exit code 2, no traceback."""
