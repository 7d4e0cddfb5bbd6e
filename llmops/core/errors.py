"""The one base class of every expected failure, and the kind refused before any work."""


class LlmopsError(Exception):
    """Bad input, a failed verdict, unreachable storage: a failure whose message is all a person needs.

    The CLI prints it as one `error:` line and exits non-zero, the flow ends its run Failed
    with it; anything else is a bug and keeps its traceback.
    """


class Refused(LlmopsError):
    """Input refused before any work, with nothing written: params that contradict each other or the machine, a
    base model or chat template that cannot be used, data that cannot be trained on as params say. Exit code 2."""
