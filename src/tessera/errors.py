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


class SourceUnavailable(Exception):
    """A data source that failed for a transient reason (an outage, throttling, timeouts) and kept
    failing past the retries. Not the user's to fix and not a property of the scenes: the tile
    fails (nothing partial is kept, no scene is recorded as skipped) and a rerun continues.

    The message names the source and what failed, in one line; the CLI adds the advice and exits
    with ``EXIT_SOURCE_UNAVAILABLE`` so that Snakemake's retries (``--retries``) run the job again.
    """


# sysexits.h EX_TEMPFAIL: "temporary failure, indicating something that is not really an error".
EXIT_SOURCE_UNAVAILABLE = 75
