"""A parent task's view of its children: how many are in each status, and the weighted
sums its progress is the mean of. Kept in the parent's row and changed in the same
transaction as each child's event (`lifecycle`). Pure.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace

from .models import TaskStatus

#: Levels of children below a root task, at most.
MAX_DEPTH = 4
#: Children of one parent, at most.
MAX_CHILDREN = 1000
#: Digits a parent's progress is rounded to (the weighted sums are floats).
PROGRESS_DIGITS = 6


@dataclass(frozen=True, slots=True)
class Tree:
    total: int = 0
    pending: int = 0
    running: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    #: Sum of the children's weights, and of weight x effective progress (a finished child
    #: counts 100).
    weight: float = 0.0
    weighted: float = 0.0

    @property
    def unfinished(self) -> int:
        return self.pending + self.running

    @property
    def progress(self) -> float:
        """The weighted mean of the children's progress."""
        if self.weight <= 0:
            return 0
        value = round(self.weighted / self.weight, PROGRESS_DIGITS)
        value = min(100.0, max(0.0, value))
        return int(value) if value == int(value) else value

    def counts(self) -> dict[str, int]:
        return {
            "total": self.total,
            "pending": self.pending,
            "running": self.running,
            "completed": self.completed,
            "failed": self.failed,
            "cancelled": self.cancelled,
        }

    def moved(
        self,
        before: TaskStatus | None,
        after: TaskStatus,
        weight: float,
        old_progress: float,
        new_progress: float,
    ) -> Tree:
        """After a child of `weight` went from `before` (None: just created) to `after`."""
        counts = self.counts()
        if before is None:
            counts["total"] += 1
        else:
            counts[before.value] -= 1
        counts[after.value] += 1
        added = weight if before is None else 0.0
        return replace(
            self,
            **counts,
            weight=self.weight + added,
            weighted=self.weighted
            + weight
            * (
                effective(after, new_progress)
                - (0.0 if before is None else effective(before, old_progress))
            ),
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @staticmethod
    def from_json(text: str | None) -> Tree | None:
        return None if text is None else Tree(**json.loads(text))


def effective(status: TaskStatus, progress: float) -> float:
    """What a child counts for in its parent's mean: a finished child counts 100."""
    return 100.0 if status.is_terminal else float(progress)
