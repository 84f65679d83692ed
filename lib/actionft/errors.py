"""Errors meant for people: the message names the file or sample and says what to do."""


class ActionftError(Exception):
    """Raised for bad input or missing resources; the CLI prints the message without a traceback."""
