"""How the flows turn expected failures into states with one clear message, and back into exceptions."""

from __future__ import annotations

import logging
from typing import Any, Callable

from prefect import State
from prefect.states import Failed

from llmops.core.errors import LlmopsError


class Stopped(LlmopsError):
    """A task ended in a failed state; its message says why."""


def completed(state: State) -> Any:
    """The task's result, or Stopped with its state's message."""
    if not state.is_completed():
        raise Stopped(state.message)
    return state.result()


def failed_as_state(body: Callable[[], Any]) -> Any:
    """`body()`, or a Failed state with the message of the expected error it raised (not a logged traceback)."""
    try:
        return body()
    except LlmopsError as exc:
        return Failed(message=str(exc))


class _NoEmptyTraceback(logging.Filter):
    """Prefect logs a task that returned a Failed state with exc_info=True and no exception: a stray
    `NoneType: None`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[0] is None:
            record.exc_info = None
        return True


def quiet_failed_states() -> None:
    logger = logging.getLogger("prefect.task_runs")
    if not any(isinstance(f, _NoEmptyTraceback) for f in logger.filters):
        logger.addFilter(_NoEmptyTraceback())
