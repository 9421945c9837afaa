"""Errors a user can fix, reported as one line by the CLI."""


class UserError(Exception):
    """A mistake in the user's input (config, ROI, checkpoint, data) with the way to fix it.

    The message names the input and the fix; the CLI prints it alone and exits with code 2.
    """
