"""The base class of every error caused by user input (config, hostfile, dataset, checkpoint, CLI
arguments). The CLI prints such an error as one line and exits with status 2, without a traceback;
anything else is a bug and keeps its traceback."""


class UserError(Exception):
    """Bad input: the message says what is wrong and how to fix it."""
