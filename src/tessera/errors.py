"""Errors a user can fix, reported as one line by the CLI."""


class UserError(Exception):
    """A mistake in the user's input (config, ROI, checkpoint, data) with the way to fix it.

    The message names the input and the fix; the CLI prints it alone and exits with code 2.
    """


class DamagedIntermediate(UserError):
    """A work file that fails its checksum (bit rot, a cut copy). The CLI deletes it before it
    reports, so that rerunning the workflow rebuilds it instead of failing on it again."""

    def __init__(self, path, problem: str):
        super().__init__(f"{path} is damaged ({problem})")
        self.path = path
