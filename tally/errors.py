"""One error type for everything a user can get wrong: the CLI prints its message on one line."""


class TallyError(Exception):
    """A user-facing problem (bad config, missing file, malformed line): message names the culprit."""
