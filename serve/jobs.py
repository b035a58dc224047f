"""The generation queue behind `dalle serve`: one worker thread takes requests in order, so the model never
runs twice at once (two at once on a CPU would only share its cores); the requests waiting together with the same
settings share one sampling batch, and each job reports its own progress."""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from dalle_core.sampling import GenerationError

log = logging.getLogger("dalle.serve")


CANCELLED = ("cancelled", "cancelled: its client went away or cancelled it")  # a job's state and error


class QueueFull(RuntimeError):
    """More requests are waiting than the server takes (HTTP 429)."""


class Cancelled(Exception):
    """The job's client went away (or cancelled it): its sampling stops at the next step."""


@dataclass
class Job:
    """One generation request: its settings, where it is (queued, running, done, failed), its progress in
    sampling steps, and when done its ranked PNG images and their CLIP scores."""

    request: dict
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    state: str = "queued"
    steps_done: int = 0
    steps_total: int = 0
    submitted: float = field(default_factory=time.perf_counter)
    seconds: float | None = None  # from submission to the last image
    result: dict | None = None
    images: list[bytes] = field(default_factory=list)  # PNG, best first
    error: str | None = None
    bad_request: bool = False  # the error is the request's (HTTP 400), not the server's (500)
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    cancelled: bool = False  # set from the server's threads; the worker looks at it between sampling steps

    def cancel(self) -> None:
        """Stop this job: before it runs, or at its run's next sampling step (the run stops there once all its
        jobs are cancelled; the others' go on)."""
        self.cancelled = True


def run_progress(run: list[Job]) -> list[Callable[[int, int], None]]:
    """One `progress(done, total)` per job of a run, for `DALLEPipeline.__call__`'s list: each records its own job's
    sampling steps, and raises Cancelled at the first step where every job of the run is cancelled."""

    def of(job: Job) -> Callable[[int, int], None]:
        def progress(done: int, total: int) -> None:
            job.steps_done, job.steps_total = done, total
            if all(j.cancelled for j in run):
                raise Cancelled()

        return progress

    return [of(job) for job in run]


class JobQueue:
    """Runs the submitted jobs in submission order on one thread: `work(jobs)` gets the first waiting job together
    with the jobs right behind it that `joins(run so far, job)` lets share its sampling batch, so a server's users
    share one batch while no job overtakes an earlier one. `work` fills each job's `result` and `images`.

    A GenerationError `work` raises fails its jobs as bad requests, Cancelled (every job of the run cancelled)
    cancels them, any other exception fails them as a server error (logged with its traceback), and the worker
    goes on; a job cancelled while its run goes on is dropped from it (cancelled, its images not kept). At most
    `max_waiting` jobs wait (QueueFull beyond); the last `keep` finished jobs stay readable."""

    def __init__(self, work: Callable[[list[Job]], None], max_waiting: int = 16, keep: int = 64,
                 joins: Callable[[list[Job], Job], bool] = lambda run, job: False):
        self.work, self.max_waiting, self.keep, self.joins = work, max_waiting, keep, joins
        self.jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self.waiting: collections.deque[Job] = collections.deque()
        self.lock = threading.Lock()
        self.ready = threading.Condition(self.lock)
        self.closing = False
        self.worker = threading.Thread(target=self._run, name="dalle-generate", daemon=True)
        self.worker.start()

    def submit(self, request: dict) -> Job:
        with self.lock:
            queued = sum(j.state == "queued" for j in self.jobs.values())
            if queued >= self.max_waiting:
                raise QueueFull(f"{queued} requests are already waiting (the limit is {self.max_waiting}); "
                                "try again when one has finished")
            job = Job(request)
            self.jobs[job.id] = job
            self._forget_old()
            self.waiting.append(job)
            self.ready.notify()
        return job

    def get(self, job_id: str) -> Job | None:
        with self.lock:
            return self.jobs.get(job_id)

    def ahead_of(self, job: Job) -> int:
        """How many jobs run or wait before `job`."""
        with self.lock:
            ids = [j.id for j in self.jobs.values() if j.state in ("queued", "running")]
        return ids.index(job.id) if job.id in ids else 0

    def close(self) -> None:
        """Let the running jobs finish, fail the waiting ones, stop the worker."""
        with self.lock:
            self.closing = True
            self.ready.notify()
        self.worker.join(timeout=60)

    def _forget_old(self) -> None:
        finished = [i for i, j in self.jobs.items() if j.state in ("done", "failed", "cancelled")]
        for job_id in finished[:max(0, len(finished) - self.keep)]:
            del self.jobs[job_id]

    def _next(self) -> list[Job] | None:
        """The next run: the first waiting job and those right behind it that `joins` lets in (an empty run when
        only cancelled jobs waited); None when closing."""
        with self.lock:
            while not self.waiting and not self.closing:
                self.ready.wait()
            if self.closing:
                for job in self.waiting:
                    self._finish(job, "failed", "the server is shutting down")
                self.waiting.clear()
                return None
            run: list[Job] = []
            while self.waiting:
                job = self.waiting[0]
                if job.cancelled:  # its client left while it waited: it never runs, nor takes a place
                    self._finish(self.waiting.popleft(), *CANCELLED)
                elif not run or self.joins(run, job):
                    run.append(self.waiting.popleft())
                else:
                    break
            for job in run:
                job.state = "running"
            return run

    def _finish(self, job: Job, state: str, error: str | None = None, bad_request: bool = False) -> None:
        job.state, job.error, job.bad_request = state, error, bad_request
        if state != "done":
            job.images, job.result = [], None
        job.seconds = time.perf_counter() - job.submitted
        job.request = {}  # a finished job keeps its result, not its inputs (an image may be 10 MB)
        job.future.set_result(job)

    def _run(self) -> None:
        while (run := self._next()) is not None:
            if not run:  # only cancelled jobs were waiting
                continue
            live = [job for job in run if not job.cancelled]
            outcome: tuple = ("done",)
            try:
                if not live:
                    raise Cancelled()
                self.work(live)
            except Cancelled:  # nobody waits for them: the worker moves on to the next request
                outcome = CANCELLED
            except GenerationError as err:
                outcome = ("failed", str(err), True)
            except Exception as err:  # a bug or an outside failure: these requests fail, the server goes on
                log.exception("generation %s failed", ", ".join(job.id for job in live))
                first = (str(err).strip().splitlines() or [type(err).__name__])[0]
                outcome = ("failed", f"generation failed: {type(err).__name__}: {first}")
            for job in run:  # one cancelled while its run went on is dropped from it
                self._finish(job, *(CANCELLED if job.cancelled and outcome[0] == "done" else outcome))
