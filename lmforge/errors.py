"""One exception type for mistakes a user can fix.

The CLI turns it into a one-line message and exit code 2; anything else is a bug and keeps
its traceback.
"""


class LmforgeError(Exception):
    """Bad input or an impossible request, explained in one line."""
