"""The one error type that means "the user's input is wrong".

The CLI turns it into a one-line message and exit code 2; everything else is a
bug and keeps its traceback.
"""


class InputError(Exception):
    """Bad input from the user: a file, a line, a field or a flag. The message names it."""
