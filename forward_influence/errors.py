"""Errors a user can fix: bad input, a missing asset, an unknown model.

The CLI turns an `InputError` into one line on stderr starting with ``error:`` and exit code 2;
anything else is a failure of the run (exit code 1).
"""


class InputError(ValueError):
    """Input the user can correct (a path, a value, a model name); the message is one line."""
