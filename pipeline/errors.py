"""The one exception type that entry points turn into a one-line message and exit code 2."""


class UserError(Exception):
    """Bad input the user can fix: the message names the file/flag and what to do."""
