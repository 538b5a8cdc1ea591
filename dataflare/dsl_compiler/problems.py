"""Problems found in a workflow file, each with its location."""

from __future__ import annotations

from dataclasses import dataclass
from difflib import get_close_matches
from typing import Literal

Loc = tuple[str | int, ...]


def format_loc(loc: Loc) -> str:
    """A location as text: ``('sources', 'db', 'cdc', 0)`` -> ``sources.db.cdc[0]``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "workflow"


def did_you_mean(word: str, known: list[str] | tuple[str, ...]) -> str:
    """`` (did you mean 'x'?)`` when a known word is close to ``word``, else ``''``."""
    close = get_close_matches(str(word), [str(k) for k in known], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


@dataclass(frozen=True, order=True)
class Problem:
    """One problem: ``file:line:col: component.path: message``.

    A problem with ``at_run`` is a warning for ``validate`` (the workflow is well formed)
    but an error for ``run`` (e.g. an unset variable, an undefined dead-letter target).
    """

    file: str
    line: int
    col: int
    path: str
    message: str
    severity: Literal["error", "warning"] = "error"
    at_run: bool = False

    def is_error(self, for_run: bool) -> bool:
        """Whether this problem stops validation (``for_run``: stops a run)."""
        return self.severity == "error" or (for_run and self.at_run)

    def render(self, for_run: bool = False) -> str:
        """The one-line report of this problem."""
        tag = "" if self.is_error(for_run) else "warning: "
        return f"{self.file}:{self.line}:{self.col}: {self.path}: {tag}{self.message}"

    def __str__(self) -> str:
        return self.render()


class WorkflowError(Exception):
    """A workflow that cannot be compiled; ``problems`` lists every reason."""

    def __init__(self, problems: list[Problem], for_run: bool = True) -> None:
        self.problems = problems
        lines = [p.render(for_run) for p in problems if p.is_error(for_run)]
        super().__init__("invalid workflow:\n" + "\n".join(lines))
