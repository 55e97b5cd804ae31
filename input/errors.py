"""The one error type of the data pipeline.

Every problem with a user's data (a missing directory, a corrupt shard, a token id the
model cannot embed) is raised as `InputDataError`, whose message names the file and the
fix, so callers can catch data problems apart from bugs.
"""


class InputDataError(ValueError):
    """Data that cannot be used as is; the message names the file and what to do about it."""
