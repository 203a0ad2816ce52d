"""Errors a user can act on: the CLI prints them as one line, without a traceback."""


class UserError(Exception):
    """A problem with the user's input, options or environment; the message names it and the fix."""
