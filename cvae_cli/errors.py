"""The one exception type that means "the user asked for something we cannot do".

Library code raises `CvaeError` with a message that reads well on its own line; the CLI prints
that line and exits non-zero. Anything else escaping is a bug and keeps its traceback.
"""


class CvaeError(Exception):
    """A user-facing failure: bad input, missing file, unreachable hub, wrong weights."""


def describe(error: BaseException) -> str:
    """One line for a failure: a `CvaeError` as it reads, anything else prefixed with its type."""
    if isinstance(error, CvaeError):
        return str(error)
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}"
