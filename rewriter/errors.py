"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class AbliterateError(Exception):
    """A user-facing problem: bad input, a bad plan, an unknown architecture."""


def cause(exc: BaseException, limit: int = 200) -> str:
    """Another library's exception (about an input it could not take) in a few words for a
    one-line message: ``Type: first line of its message``, at most ``limit`` characters."""
    text = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
    return text if len(text) <= limit else text[: limit - 3] + "..."
