"""Errors a user can fix: bad input, a missing asset, an unknown model.

The library's messages name its parameters as a Python caller passed them (``max_tokens``); the CLI
turns an `InputError` into one line on stderr starting with ``error:``, each named parameter written
as its flag (``--max-tokens``, `InputError.command_line`), and exit code 2; anything else is a failure
of the run (exit code 1).
"""

import re


class InputError(ValueError):
    """Input the user can correct (a path, a value, a model name); the message is one line.
    `parameters` are the library parameters it names (each first mention is the parameter)."""

    def __init__(self, message: str, *parameters: str) -> None:
        super().__init__(message)
        self.parameters = parameters

    def command_line(self) -> str:
        """The message on one line, the first mention of each parameter written as its flag."""
        message = " ".join(str(self).split())
        for name in self.parameters:
            message = re.sub(rf"\b{re.escape(name)}\b", "--" + name.replace("_", "-"), message, count=1)
        return message
