"""The one base class of every expected failure."""


class LlmopsError(Exception):
    """Bad input, a failed verdict, unreachable storage: a failure whose message is all a person needs.

    The CLI prints it as one `error:` line and exits non-zero, the flow ends its run Failed
    with it; anything else is a bug and keeps its traceback.
    """
