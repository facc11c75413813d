"""Errors as a user should see them: trio nests a task's exception in ExceptionGroups, one per nursery."""

from __future__ import annotations


def first_error(error: BaseException) -> BaseException:
    """The first leaf of nested exception groups: a task's own error, not the nurseries around it."""
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error
