"""The generation queue behind `dalle serve`: one worker thread takes requests in order, so the model never
runs twice at once (two at once on a CPU would only share its cores), and each job reports its progress."""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from dalle_core.sampling import GenerationError

log = logging.getLogger("dalle.serve")


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

    def progress(self, done: int, total: int) -> None:
        """Called after every sampling step: records it, and stops a cancelled job there."""
        self.steps_done, self.steps_total = done, total
        if self.cancelled:
            raise Cancelled()

    def cancel(self) -> None:
        """Stop this job: before it runs, or at its next sampling step."""
        self.cancelled = True


class JobQueue:
    """Runs `work(job)` for each submitted job, one at a time, in submission order, on one thread.

    `work` fills `job.result` and `job.images`; a GenerationError it raises fails the job as a bad request,
    any other exception as a server error (logged with its traceback), and the worker goes on. At most
    `max_waiting` jobs wait (QueueFull beyond); the last `keep` finished jobs stay readable."""

    def __init__(self, work: Callable[[Job], None], max_waiting: int = 16, keep: int = 64):
        self.work, self.max_waiting, self.keep = work, max_waiting, keep
        self.jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self.waiting: queue.Queue[Job | None] = queue.Queue()
        self.lock = threading.Lock()
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
        self.waiting.put(job)
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
        """Let the running job finish, fail the waiting ones, stop the worker."""
        self.closing = True
        self.waiting.put(None)
        self.worker.join(timeout=60)

    def _forget_old(self) -> None:
        finished = [i for i, j in self.jobs.items() if j.state in ("done", "failed", "cancelled")]
        for job_id in finished[:max(0, len(finished) - self.keep)]:
            del self.jobs[job_id]

    def _run(self) -> None:
        while (job := self.waiting.get()) is not None:
            job.state = "running"
            try:
                if self.closing:
                    raise RuntimeError("the server is shutting down")
                if job.cancelled:
                    raise Cancelled()
                self.work(job)
                job.state = "done"
            except Cancelled:  # nobody waits for it: the worker moves on to the next request
                job.error, job.state = "cancelled: its client went away or cancelled it", "cancelled"
            except GenerationError as err:
                job.error, job.bad_request, job.state = str(err), True, "failed"
            except Exception as err:  # a bug or an outside failure: this request fails, the server goes on
                log.exception("generation %s failed", job.id)
                first = (str(err).strip().splitlines() or [type(err).__name__])[0]
                job.error, job.state = f"generation failed: {type(err).__name__}: {first}", "failed"
            job.seconds = time.perf_counter() - job.submitted
            job.request = {}  # a finished job keeps its result, not its inputs (an image may be 10 MB)
            job.future.set_result(job)
