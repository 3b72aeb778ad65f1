"""The one exception type that means "the user asked for something we cannot do".

Library code raises `CvaeError` with a message that reads well on its own line; the CLI prints
that line and exits non-zero. Anything else escaping is a bug and keeps its traceback.
"""


class CvaeError(Exception):
    """A user-facing failure: bad input, missing file, unreachable hub, wrong weights."""
