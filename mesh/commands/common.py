"""Helpers every command module shares: the error type and the identity-field rule."""

from __future__ import annotations

from typing import Any, Callable

__all__ = ["CommandError", "Handler", "Result", "State", "refuse_identity_changes"]

State = dict[str, dict[str, dict[str, Any]]]
Result = dict[str, Any]
# A handler returns ({collection: new collection dict}, result) and never mutates `state`.
Handler = Callable[[State, dict[str, Any]], tuple[dict, Result]]


class CommandError(Exception):
    """A command that cannot apply: the state is left unchanged, the submitter is told why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def refuse_identity_changes(changes: dict[str, Any], identity: tuple[str, ...]) -> None:
    if touched := sorted(set(changes) & set(identity)):
        raise CommandError("immutable_field", f"{', '.join(touched)} cannot be changed")
