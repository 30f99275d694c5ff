"""Task lifecycle as pure functions: the changes a task can go through, and a batch's plan.

Nothing here does I/O. `plan_batch` takes the requests of one group commit and a view of
the committed state (`TaskView`, implemented by the store inside its write transaction)
and decides, request by request, what each one does: the new task states, the events with
their seqs, or the error that refuses it. Requests later in a batch see what earlier ones
staged (two progress posts to one task get consecutive seqs). The store then writes the
plan in the same transaction; if the transaction fails, nothing of it happened, and the
plan (refusals included) is thrown away, so a request refused only because of what an
earlier request staged is never refused for a change that did not happen.
"""

from __future__ import annotations

import dataclasses
import functools
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from .errors import (
    ApiError,
    Conflict,
    NotFound,
    QuotaExceeded,
    TaskFinished,
    Unauthorized,
    ValidationFailed,
)
from .idempotency import Answer, Claim
from .meter import Meter, advance
from .models import Event, EventType, RawJson, Task, TaskState, TaskStatus, dumps
from .tree import MAX_CHILDREN, MAX_DEPTH, Tree

#: Bytes a task row counts for the storage quota besides its params and result.
TASK_ROW_BYTES = 256


@dataclass(frozen=True, slots=True)
class Create:
    user_id: int
    kind: str
    params: RawJson
    #: The parent task (None: a root task) and this task's weight in its mean.
    parent_id: str | None = None
    weight: float = 1
    #: 0: finished by its owner; 1: auto_finish; 2: auto_finish with fail_fast.
    finish: int = 0
    #: Children created with it, in the same transaction (their parent_id is this task).
    children: tuple[Create, ...] = ()


@dataclass(frozen=True, slots=True)
class ChildResult:
    """What a finisher sees of a child when its parent completes by itself."""

    id: str
    status: TaskStatus
    result: RawJson | None


#: Per parent kind: extra members of the result of a parent that completes by itself
#: (auto_finish), from its children (e.g. the multi-code analysis ranks them). Pure.
Finisher = Callable[[list[ChildResult]], dict[str, object]]
FINISHERS: dict[str, Finisher] = {}


@dataclass(frozen=True, slots=True)
class Progress:
    progress: float
    step: str | None = None
    message: str | None = None
    #: A built-in job's resume state (compact JSON), stored with the event.
    checkpoint: RawJson | None = None


@dataclass(frozen=True, slots=True)
class ProgressBatch:
    """Several progress updates of one task, applied in order as consecutive seqs: all of
    them or (one refused) none."""

    items: tuple[Progress, ...]


@dataclass(frozen=True, slots=True)
class Complete:
    result: RawJson | None = None


@dataclass(frozen=True, slots=True)
class Fail:
    error: str


@dataclass(frozen=True, slots=True)
class Cancel:
    reason: str = "cancelled by user"


Change = Progress | ProgressBatch | Complete | Fail | Cancel


@dataclass(frozen=True, slots=True)
class Request:
    """One change asked of the tracker."""

    #: "" for a Create (the id is chosen when planning).
    task_id: str
    #: The caller's user id, checked against the task's owner; None: the server itself.
    owner_id: int | None
    change: Create | Change
    #: Its Idempotency-Key, if it came with one.
    claim: Claim | None = None


@dataclass(frozen=True, slots=True)
class Quotas:
    """Per-user limits checked while planning (0: no limit)."""

    max_unfinished_tasks: int = 0
    max_stored_bytes: int = 0


class TaskView(Protocol):
    """The committed state a plan starts from, read inside the write transaction."""

    def task(self, task_id: str) -> TaskState | None:
        """A task's state, or None if there is no such task."""

    def unfinished_tasks(self, user_id: int) -> int:
        """How many pending or running tasks the user has."""

    def stored_bytes(self, user_id: int) -> int | None:
        """Bytes the user has stored (the quota's measure); None: no such user."""

    def answer(self, claim: Claim) -> Answer | None:
        """The stored answer of the claim's key (kept KEEP_SECONDS), if any."""

    def children(self, parent_id: str) -> list[TaskState]:
        """The task's children as committed (for cancelling them, or finishing it)."""

    def results(self, task_ids: Sequence[str]) -> dict[str, RawJson | None]:
        """The committed results of these tasks (for a parent's finisher)."""


@dataclass(slots=True)
class TaskWrite:
    """What a plan writes for one task: its new state and the events that led to it."""

    state: TaskState
    events: list[Event] = field(default_factory=list)
    #: The full row of a task created by this plan (None: an existing task changes).
    created: Task | None = None
    #: The task's `message` column: set to `message` when `set_message`, else kept.
    set_message: bool = False
    message: str | None = None
    result: RawJson | None = None
    error: str | None = None
    #: The task's checkpoint column: set to `checkpoint` when `set_checkpoint`.
    set_checkpoint: bool = False
    checkpoint: RawJson | None = None
    #: Change of the task row's counted bytes (params, result).
    row_bytes: int = 0


@dataclass(slots=True)
class Outcome:
    """What one request got: its events (accepted) or an error (refused)."""

    events: list[Event] = field(default_factory=list)
    error: ApiError | None = None
    #: The created task, for a Create.
    created: Task | None = None
    #: An earlier answer to the same Idempotency-Key, given again (nothing was done).
    replayed: Answer | None = None
    #: Events of other tasks this request caused, committed with it: its parents'
    #: progress, its children cancelled, a parent finishing by itself.
    related: list[Event] = field(default_factory=list)
    #: Children created with a Create (the multi-code analysis).
    children: list[Task] = field(default_factory=list)


@dataclass(slots=True)
class Plan:
    outcomes: list[Outcome]
    writes: dict[str, TaskWrite]
    #: Per user: change of unfinished tasks and of stored bytes, for the store's caches.
    unfinished_delta: dict[int, int]
    bytes_delta: dict[int, int]
    #: Answers of idempotent requests to store with the plan (their keys' first use).
    answers: list[tuple[Claim, Answer]] = field(default_factory=list)

    @property
    def accepted(self) -> int:
        return sum(1 for o in self.outcomes if o.error is None)


def answer_of(change: Create | Change, outcome: Outcome, fingerprint: str = "") -> Answer:
    """The HTTP answer of an accepted request: 201 and the task for a create; else 200 and
    the last seq (a batch also names its first update's seq)."""
    if isinstance(change, Create):
        assert outcome.created is not None
        return Answer(fingerprint, 201, outcome.created.to_json())
    events = outcome.events
    if isinstance(change, ProgressBatch):
        progress = [e.seq for e in events if e.event is EventType.PROGRESS]
        return Answer(fingerprint, 200, f'{{"seq":{events[-1].seq},"first_seq":{progress[0]}}}')
    return Answer(fingerprint, 200, f'{{"seq":{events[-1].seq}}}')


def _event(
    state: TaskState,
    kind: EventType,
    ts: str,
    *,
    message: str | None = None,
    result: RawJson | None = None,
    error: str | None = None,
    child: RawJson | None = None,
) -> Event:
    return Event(
        task_id=state.id,
        seq=state.seq,
        event=kind,
        status=state.status,
        progress=state.progress,
        step=state.step,
        message=message,
        ts=ts,
        result=result,
        error=error,
        rate=state.rate if kind is EventType.PROGRESS else None,
        eta_s=state.eta_s if kind is EventType.PROGRESS else None,
        child=child,
    )


@functools.lru_cache(maxsize=1024)  # the requests of one batch share a few timestamps
def epoch(ts: str) -> float:
    """An event time (ISO 8601 UTC, as `utc_now` makes) as epoch seconds."""
    return datetime.fromisoformat(ts).timestamp()


def _start(state: TaskState, ts: str) -> tuple[TaskState, Event]:
    state = dataclasses.replace(
        state, status=TaskStatus.RUNNING, seq=state.seq + 1, started_at=ts, updated_at=ts
    )
    return state, _event(state, EventType.STARTED, ts)


def _progressed(state: TaskState, progress: float, step: str | None, ts: str) -> TaskState:
    """The state after a progress update: new progress, step and seq, rate and ETA."""
    meter, rate, eta = advance(Meter.from_json(state.meter), float(progress), epoch(ts))
    return dataclasses.replace(
        state,
        progress=progress,
        seq=state.seq + 1,
        updated_at=ts,
        step=step if step is not None else state.step,
        meter=meter.to_json(),
        rate=rate,
        eta_s=eta,
    )


def transition(state: TaskState, change: Change, ts: str) -> tuple[TaskState, list[Event]]:
    """The task's state after `change` and the events it produces. Pure.

    Raises:
        TaskFinished: the task is already completed, failed or cancelled.
    """
    if state.status.is_terminal:
        raise TaskFinished(f"task is already {state.status.value}")
    events: list[Event] = []
    if isinstance(change, Progress | Complete) and state.status is TaskStatus.PENDING:
        state, started = _start(state, ts)
        events.append(started)
    if isinstance(change, Progress):
        state = _progressed(state, change.progress, change.step, ts)
        events.append(_event(state, EventType.PROGRESS, ts, message=change.message))
        return state, events
    if isinstance(change, Complete):
        state = dataclasses.replace(
            state,
            status=TaskStatus.COMPLETED,
            progress=100,
            seq=state.seq + 1,
            updated_at=ts,
            finished_at=ts,
            rate=None,
            eta_s=None,
        )
        events.append(_event(state, EventType.COMPLETED, ts, result=change.result or "{}"))
        return state, events
    if isinstance(change, Fail):
        status, kind, error = TaskStatus.FAILED, EventType.FAILED, change.error
    else:
        status, kind, error = TaskStatus.CANCELLED, EventType.CANCELLED, change.reason
    state = dataclasses.replace(
        state,
        status=status,
        seq=state.seq + 1,
        updated_at=ts,
        finished_at=ts,
        rate=None,
        eta_s=None,
    )
    events.append(_event(state, kind, ts, error=error))
    return state, events


def new_task(
    create: Create, task_id: str, ts: str, depth: int = 0
) -> tuple[Task, TaskState, Event]:
    """A pending task and its `created` event (seq 1)."""
    task = Task(
        id=task_id,
        user_id=create.user_id,
        kind=create.kind,
        params=create.params,
        status=TaskStatus.PENDING,
        progress=0,
        step=None,
        message=None,
        result=None,
        error=None,
        seq=1,
        created_at=ts,
        updated_at=ts,
        parent_id=create.parent_id,
        weight=create.weight,
        depth=depth,
        finish=create.finish,
    )
    state = TaskState(
        id=task.id,
        user_id=task.user_id,
        kind=task.kind,
        status=task.status,
        progress=0,
        step=None,
        seq=1,
        created_at=ts,
        updated_at=ts,
        parent_id=create.parent_id,
        weight=create.weight,
        depth=depth,
        finish=create.finish,
    )
    return task, state, _event(state, EventType.CREATED, ts)


def _tree(state: TaskState) -> Tree:
    return Tree.from_json(state.tree) or Tree()


class _Planner:
    """The state of one batch being planned: the committed view plus what is staged."""

    def __init__(self, view: TaskView, quotas: Quotas, clock: Callable[[], str]) -> None:
        self._view = view
        self._quotas = quotas
        self._clock = clock
        self.writes: dict[str, TaskWrite] = {}
        self.unfinished_delta: dict[int, int] = {}
        self.bytes_delta: dict[int, int] = {}
        #: Children created in this batch, by parent id (not yet in the view).
        self._new_children: dict[str, list[str]] = {}

    def _state(self, task_id: str) -> TaskState | None:
        staged = self.writes.get(task_id)
        return staged.state if staged is not None else self._view.task(task_id)

    def _bytes_after(self, user_id: int, added: int) -> int | None:
        stored = self._view.stored_bytes(user_id)
        if stored is None:
            return None
        return stored + self.bytes_delta.get(user_id, 0) + added

    def _charge(self, user_id: int, added: int) -> None:
        self.bytes_delta[user_id] = self.bytes_delta.get(user_id, 0) + added

    # -- creating ----------------------------------------------------------------------------

    def create(self, create: Create) -> Outcome:
        depth = 0
        if create.parent_id is not None:
            parent = self._state(create.parent_id)
            if parent is None or parent.user_id != create.user_id:
                return Outcome(error=NotFound("parent task not found"))
            if parent.status.is_terminal:
                return Outcome(
                    error=Conflict(
                        f"parent task is already {parent.status.value}", code="parent_finished"
                    )
                )
            depth = parent.depth + 1
            if depth > MAX_DEPTH:
                return Outcome(
                    error=ValidationFailed(
                        "invalid request",
                        fields={"parent_id": [f"At most {MAX_DEPTH} levels below a root task."]},
                    )
                )
            if _tree(parent).total >= MAX_CHILDREN:
                return Outcome(
                    error=ValidationFailed(
                        "invalid request",
                        fields={"parent_id": [f"At most {MAX_CHILDREN} children per task."]},
                    )
                )
        refused = self._refuse_create(create, 1 + len(create.children))
        if refused is not None:
            return refused
        ts = self._clock()
        task, state, event = new_task(create, uuid.uuid4().hex, ts, depth)
        row_bytes = TASK_ROW_BYTES + len(create.params.encode())
        self.writes[task.id] = TaskWrite(
            state=state, events=[event], created=task, row_bytes=row_bytes
        )
        self.unfinished_delta[create.user_id] = self.unfinished_delta.get(create.user_id, 0) + 1
        self._charge(create.user_id, row_bytes + event.stored_bytes)
        outcome = Outcome(events=[event], created=task)
        if create.parent_id is not None:
            self._new_children.setdefault(create.parent_id, []).append(task.id)
            self._moved(None, state, outcome.related)
        for child in create.children:
            made = self.create(dataclasses.replace(child, parent_id=task.id))
            assert made.created is not None and made.error is None  # checked above
            outcome.children.append(made.created)
            outcome.related.extend(made.events + made.related)
        if create.children:
            # The answer shows the parent with its children counted.
            outcome.created = dataclasses.replace(task, tree=self.writes[task.id].state.tree)
        return outcome

    def _refuse_create(self, create: Create, tasks: int) -> Outcome | None:
        """The quota checks of a create of `tasks` tasks (a parent and its children)."""
        added = (
            tasks * (TASK_ROW_BYTES + 128)
            + len(create.params.encode())
            + sum(len(c.params.encode()) for c in create.children)
        )
        after = self._bytes_after(create.user_id, added)
        if after is None:
            # A well-signed token for a user this database does not have.
            return Outcome(error=Unauthorized("unknown user", code="invalid_token"))
        unfinished = self._view.unfinished_tasks(create.user_id) + self.unfinished_delta.get(
            create.user_id, 0
        )
        quota = self._quotas
        if quota.max_unfinished_tasks and unfinished + tasks > quota.max_unfinished_tasks:
            return Outcome(
                error=QuotaExceeded(
                    f"at most {quota.max_unfinished_tasks} unfinished tasks per user;"
                    " finish or cancel one first",
                    fields={"quota": "unfinished_tasks"},
                ),
            )
        if quota.max_stored_bytes and after > quota.max_stored_bytes:
            return self._over_storage(create.user_id)
        return None

    def _over_storage(self, user_id: int) -> Outcome:
        return Outcome(
            error=QuotaExceeded(
                f"at most {self._quotas.max_stored_bytes} bytes stored per user;"
                " finished tasks are deleted by retention",
                fields={"quota": "stored_bytes"},
            ),
        )

    # -- changing ----------------------------------------------------------------------------

    def change(self, request: Request) -> Outcome:
        change = request.change
        assert not isinstance(change, Create)
        outcome = Outcome()
        self._apply(request.task_id, request.owner_id, change, outcome, own=True)
        return outcome

    def _apply(
        self, task_id: str, owner_id: int | None, change: Change, outcome: Outcome, *, own: bool
    ) -> None:
        """Apply `change` to the task. `own`: the request's own task (refusals and events
        go to the outcome's error and events); else a task the request reaches (a child
        cancelled with its parent, a parent finishing by itself): its events go to
        `outcome.related`, and a change it cannot take is skipped."""
        state = self._state(task_id)
        if state is None or (owner_id is not None and state.user_id != owner_id):
            outcome.error = NotFound("task not found")
            return
        if own and isinstance(change, Progress | ProgressBatch) and _tree(state).total:
            outcome.error = Conflict(
                "this task's progress is the weighted mean of its children's; post to them",
                code="progress_from_children",
            )
            return
        ts = self._clock()
        try:
            if isinstance(change, ProgressBatch):
                after, events = state, []
                for item in change.items:
                    after, more = transition(after, item, ts)
                    events.extend(more)
            else:
                after, events = transition(state, change, ts)
        except TaskFinished as exc:
            if own:
                outcome.error = exc
            return
        added = sum(e.stored_bytes for e in events)
        row_bytes = 0
        if isinstance(change, Complete):
            row_bytes = len((events[-1].result or "").encode())
        quota = self._quotas.max_stored_bytes
        if own and isinstance(change, Progress | ProgressBatch) and quota:
            # Progress may be refused for storage; a task can always be finished.
            after_bytes = self._bytes_after(state.user_id, added)
            if after_bytes is not None and after_bytes > quota:
                outcome.error = self._over_storage(state.user_id).error
                return
        staged = self.writes.get(task_id)
        write = staged or TaskWrite(state=state)
        write.state = after
        write.events.extend(events)
        write.row_bytes += row_bytes
        if isinstance(change, ProgressBatch):
            write.set_message, write.message = True, change.items[-1].message
        elif isinstance(change, Progress):
            write.set_message, write.message = True, change.message
            if change.checkpoint is not None:
                write.set_checkpoint, write.checkpoint = True, change.checkpoint
        elif isinstance(change, Complete):
            write.result = events[-1].result
        else:
            write.error = events[-1].error
        if isinstance(change, Complete | Fail | Cancel):
            # `message` belongs to one progress update: the task's ends with the task.
            write.set_message, write.message = True, None
        if after.status.is_terminal:
            write.set_checkpoint, write.checkpoint = True, None
            self.unfinished_delta[after.user_id] = self.unfinished_delta.get(after.user_id, 0) - 1
        self.writes[task_id] = write
        self._charge(state.user_id, added + row_bytes)
        (outcome.events if own else outcome.related).extend(events)
        if after.status.is_terminal and _tree(after).unfinished:
            self._end_children(after, change, outcome)
        if after.parent_id is not None:
            self._moved(state, after, outcome.related)

    # -- parents and children ----------------------------------------------------------------

    def _children(self, parent_id: str) -> list[TaskState]:
        """The parent's children: as committed, overlaid with what this batch staged."""
        seen: dict[str, TaskState] = {}
        for child in self._view.children(parent_id):
            seen[child.id] = self._state(child.id) or child
        for child_id in self._new_children.get(parent_id, ()):
            state = self._state(child_id)
            if state is not None:
                seen[child_id] = state
        return sorted(seen.values(), key=lambda c: (c.created_at, c.id))

    def _end_children(self, parent: TaskState, change: Change, outcome: Outcome) -> None:
        """A parent that finished cancels its unfinished children (theirs in turn)."""
        if isinstance(change, Cancel):
            reason = change.reason
        else:
            reason = f"parent task {parent.status.value}"
        for child in self._children(parent.id):
            if not child.status.is_terminal:
                self._apply(child.id, None, Cancel(reason), outcome, own=False)

    def _moved(self, before: TaskState | None, after: TaskState, related: list[Event]) -> None:
        """A child changed (`before` None: it was just created): update its parent's counts
        and progress, with a progress event naming the child when that moved the parent;
        then the grandparents; then finish the parent if it finishes by itself."""
        assert after.parent_id is not None
        parent = self._state(after.parent_id)
        if parent is None:
            return  # deleted by retention meanwhile
        tree = _tree(parent)
        moved = tree.moved(
            None if before is None else before.status,
            after.status,
            float(after.weight),
            0.0 if before is None else float(before.progress),
            float(after.progress),
        )
        updated = dataclasses.replace(parent, tree=moved.to_json())
        write = self.writes.get(parent.id) or TaskWrite(state=parent)
        status_changed = before is None or before.status is not after.status
        progress = moved.progress
        announce = not parent.status.is_terminal and (progress != parent.progress or status_changed)
        if announce and parent.status is TaskStatus.PENDING and after.status is TaskStatus.PENDING:
            announce = False  # a pending parent starts when a child does
        events: list[Event] = []
        if announce:
            ts = self._clock()
            if updated.status is TaskStatus.PENDING:
                updated, started = _start(updated, ts)
                events.append(started)
            updated = _progressed(updated, progress, None, ts)
            child = dumps(
                {
                    "id": after.id,
                    "seq": after.seq,
                    "status": after.status.value,
                    "progress": after.progress,
                }
            )
            events.append(_event(updated, EventType.PROGRESS, ts, child=child))
            write.set_message, write.message = True, None
        write.state = updated
        write.events.extend(events)
        self.writes[parent.id] = write
        related.extend(events)
        self._charge(parent.user_id, sum(e.stored_bytes for e in events))
        if events and updated.parent_id is not None:
            self._moved(parent, updated, related)
        newly_finished = after.status.is_terminal and (
            before is None or not before.status.is_terminal
        )
        if parent.finish and newly_finished and not updated.status.is_terminal:
            self._finish_by_itself(updated, after, moved, related)

    def _finish_by_itself(
        self, parent: TaskState, child: TaskState, tree: Tree, related: list[Event]
    ) -> None:
        outcome = Outcome(related=related)
        change: Change
        if child.status is TaskStatus.FAILED and parent.finish > 1:
            change = Fail(f"child task {child.id} failed")
        elif tree.unfinished:
            return
        elif tree.completed == tree.total:
            change = Complete(self._finish_result(parent))
        else:
            missed = tree.total - tree.completed
            change = Fail(f"{missed} of {tree.total} child tasks did not complete")
        self._apply(parent.id, None, change, outcome, own=False)

    def _finish_result(self, parent: TaskState) -> RawJson:
        """A parent completed by itself: its children's ids and statuses, and what its kind's
        finisher adds (FINISHERS)."""
        children = self._children(parent.id)
        result: dict[str, object] = {
            "children": [{"id": c.id, "status": c.status.value} for c in children]
        }
        finisher = FINISHERS.get(parent.kind)
        if finisher is not None:
            committed = self._view.results([c.id for c in children])
            results = []
            for child in children:
                staged = self.writes.get(child.id)
                text = committed.get(child.id)
                if staged is not None and staged.result:
                    text = staged.result
                results.append(ChildResult(child.id, child.status, text))
            result.update(finisher(results))
        return dumps(result)


def plan_batch(
    requests: Sequence[Request], view: TaskView, quotas: Quotas, clock: Callable[[], str]
) -> Plan:
    """Decide what each request of a batch does, in order, on top of `view`.

    Pure but for `clock` (the time of each event) and the random ids of created tasks.
    """
    planner = _Planner(view, quotas, clock)
    #: The first answer of each key used in this batch (replayed to a second use).
    answers: dict[tuple[int, str], tuple[Claim, Answer]] = {}
    outcomes: list[Outcome] = []
    for request in requests:
        claim = request.claim
        if claim is not None:
            staged = answers.get((claim.user_id, claim.key))
            earlier = staged[1] if staged is not None else view.answer(claim)
            if earlier is not None:
                outcomes.append(_replay(claim, earlier))
                continue
        change = request.change
        outcome = planner.create(change) if isinstance(change, Create) else planner.change(request)
        outcomes.append(outcome)
        if claim is not None and outcome.error is None:
            # Refusals are not kept: a retry of a refused request is tried again.
            answer = answer_of(change, outcome, claim.fingerprint)
            answers[(claim.user_id, claim.key)] = (claim, answer)
    return Plan(
        outcomes=outcomes,
        writes=planner.writes,
        unfinished_delta=planner.unfinished_delta,
        bytes_delta=planner.bytes_delta,
        answers=list(answers.values()),
    )


def _replay(claim: Claim, earlier: Answer) -> Outcome:
    if earlier.fingerprint != claim.fingerprint:
        return Outcome(
            error=ValidationFailed(
                "this Idempotency-Key was used for a different request; use a new key",
                code="idempotency_key_reused",
            )
        )
    return Outcome(replayed=earlier)
