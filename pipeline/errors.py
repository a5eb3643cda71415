"""The one exception type that entry points turn into a one-line message and exit code 2."""


class UserError(Exception):
    """Bad input the user can fix: the message names the file/flag and what to do."""


def one_line(e: BaseException) -> str:
    """An exception's text on one line (its type name when it has none), for UserError messages."""
    text = str(e).strip() or type(e).__name__
    return " ".join(text.split())
