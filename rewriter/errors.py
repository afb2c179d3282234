"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class AbliterateError(Exception):
    """A user-facing problem: bad input, a bad plan, an unknown architecture."""
