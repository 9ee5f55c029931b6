"""Errors that are the user's to fix: the CLI prints them as one clear line, never as a traceback."""


class UserError(Exception):
    """Bad input (config, data file, arguments): the message names the file, key or value and what was expected."""
