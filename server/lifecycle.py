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
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from .errors import ApiError, NotFound, QuotaExceeded, TaskFinished, Unauthorized, ValidationFailed
from .idempotency import Answer, Claim
from .models import Event, EventType, RawJson, Task, TaskState, TaskStatus

#: Bytes a task row counts for the storage quota besides its params and result.
TASK_ROW_BYTES = 256


@dataclass(frozen=True, slots=True)
class Create:
    user_id: int
    kind: str
    params: RawJson


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
    )


def _start(state: TaskState, ts: str) -> tuple[TaskState, Event]:
    state = dataclasses.replace(
        state, status=TaskStatus.RUNNING, seq=state.seq + 1, started_at=ts, updated_at=ts
    )
    return state, _event(state, EventType.STARTED, ts)


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
        state = dataclasses.replace(
            state,
            progress=change.progress,
            seq=state.seq + 1,
            updated_at=ts,
            step=change.step if change.step is not None else state.step,
        )
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
        )
        events.append(_event(state, EventType.COMPLETED, ts, result=change.result or "{}"))
        return state, events
    if isinstance(change, Fail):
        status, kind, error = TaskStatus.FAILED, EventType.FAILED, change.error
    else:
        status, kind, error = TaskStatus.CANCELLED, EventType.CANCELLED, change.reason
    state = dataclasses.replace(
        state, status=status, seq=state.seq + 1, updated_at=ts, finished_at=ts
    )
    events.append(_event(state, kind, ts, error=error))
    return state, events


def new_task(create: Create, task_id: str, ts: str) -> tuple[Task, TaskState, Event]:
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
    )
    return task, state, _event(state, EventType.CREATED, ts)


class _Planner:
    """The state of one batch being planned: the committed view plus what is staged."""

    def __init__(self, view: TaskView, quotas: Quotas, clock: Callable[[], str]) -> None:
        self._view = view
        self._quotas = quotas
        self._clock = clock
        self.writes: dict[str, TaskWrite] = {}
        self.unfinished_delta: dict[int, int] = {}
        self.bytes_delta: dict[int, int] = {}

    def _bytes_after(self, user_id: int, added: int) -> int | None:
        stored = self._view.stored_bytes(user_id)
        if stored is None:
            return None
        return stored + self.bytes_delta.get(user_id, 0) + added

    def _charge(self, user_id: int, added: int) -> None:
        self.bytes_delta[user_id] = self.bytes_delta.get(user_id, 0) + added

    def create(self, create: Create) -> Outcome:
        task, state, event = new_task(create, uuid.uuid4().hex, self._clock())
        row_bytes = TASK_ROW_BYTES + len(create.params.encode())
        added = row_bytes + event.stored_bytes
        after = self._bytes_after(create.user_id, added)
        if after is None:
            # A well-signed token for a user this database does not have.
            return Outcome(error=Unauthorized("unknown user", code="invalid_token"))
        unfinished = self._view.unfinished_tasks(create.user_id) + self.unfinished_delta.get(
            create.user_id, 0
        )
        quota = self._quotas
        if quota.max_unfinished_tasks and unfinished >= quota.max_unfinished_tasks:
            return Outcome(
                error=QuotaExceeded(
                    f"at most {quota.max_unfinished_tasks} unfinished tasks per user;"
                    " finish or cancel one first",
                    fields={"quota": "unfinished_tasks"},
                ),
            )
        if quota.max_stored_bytes and after > quota.max_stored_bytes:
            return self._over_storage(create.user_id)
        self.writes[task.id] = TaskWrite(
            state=state, events=[event], created=task, row_bytes=row_bytes
        )
        self.unfinished_delta[create.user_id] = self.unfinished_delta.get(create.user_id, 0) + 1
        self._charge(create.user_id, added)
        return Outcome(events=[event], created=task)

    def _over_storage(self, user_id: int) -> Outcome:
        return Outcome(
            error=QuotaExceeded(
                f"at most {self._quotas.max_stored_bytes} bytes stored per user;"
                " finished tasks are deleted by retention",
                fields={"quota": "stored_bytes"},
            ),
        )

    def change(self, request: Request) -> Outcome:
        staged = self.writes.get(request.task_id)
        state = staged.state if staged is not None else self._view.task(request.task_id)
        if state is None or (request.owner_id is not None and state.user_id != request.owner_id):
            return Outcome(error=NotFound("task not found"))
        change = request.change
        assert not isinstance(change, Create)
        try:
            if isinstance(change, ProgressBatch):
                ts = self._clock()
                after, events = state, []
                for item in change.items:
                    after, more = transition(after, item, ts)
                    events.extend(more)
            else:
                after, events = transition(state, change, self._clock())
        except TaskFinished as exc:
            return Outcome(error=exc)
        added = sum(e.stored_bytes for e in events)
        row_bytes = 0
        if isinstance(change, Complete):
            row_bytes = len((events[-1].result or "").encode())
        quota = self._quotas.max_stored_bytes
        if isinstance(change, Progress | ProgressBatch) and quota:
            # Progress may be refused for storage; a task can always be finished.
            after_bytes = self._bytes_after(state.user_id, added)
            if after_bytes is not None and after_bytes > quota:
                return self._over_storage(state.user_id)
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
        self.writes[request.task_id] = write
        self._charge(state.user_id, added + row_bytes)
        return Outcome(events=events)


def plan_batch(
    requests: Sequence[Request], view: TaskView, quotas: Quotas, clock: Callable[[], str]
) -> Plan:
    """Decide what each request of a batch does, in order, on top of `view`.

    Pure but for `clock` (the time of each event) and the random ids of created tasks.
    """
    planner = _Planner(view, quotas, clock)
    answers: dict[tuple[int, str], Answer] = {}
    outcomes: list[Outcome] = []
    for request in requests:
        claim = request.claim
        if claim is not None:
            earlier = answers.get((claim.user_id, claim.key)) or view.answer(claim)
            if earlier is not None:
                outcomes.append(_replay(claim, earlier))
                continue
        change = request.change
        outcome = planner.create(change) if isinstance(change, Create) else planner.change(request)
        outcomes.append(outcome)
        if claim is not None and outcome.error is None:
            # Refusals are not kept: a retry of a refused request is tried again.
            answers[(claim.user_id, claim.key)] = answer_of(change, outcome, claim.fingerprint)
    return Plan(
        outcomes=outcomes,
        writes=planner.writes,
        unfinished_delta=planner.unfinished_delta,
        bytes_delta=planner.bytes_delta,
        answers=[(Claim(u, k, a.fingerprint), a) for (u, k), a in answers.items()],
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
