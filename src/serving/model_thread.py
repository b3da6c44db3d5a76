"""The one thread that does the served model's CPU work: loading it, checking adapters
against it, and decoding.

PyTorch's CPU kernels run on OpenMP, and OpenMP gives every thread that starts parallel work
a team of worker threads of its own. Once two long-lived threads each have one (the thread
that loaded the model and the scheduler's), their workers outnumber the cores and no longer
wait spinning between kernels: each small parallel kernel then pays for waking its workers.
Measured on a 2-core CPU (torch 2.13): one decode step of the tiny model took 3.4 ms on the
thread that had loaded the model and 10.6 ms on another thread (100M model: 20.5 against
33.6 ms); loaded and decoded on the same thread, 3.3 and 20.6 ms. Even filling the
scheduler's row buffers (a zero fill of 16 x 32,000 values is parallel work) on Cog's thread
made the steps 2x slower. So the model is loaded on this thread, the scheduler's buffers are
made and its loop runs on it (src/serving/scheduler.py), and the torch work of a request's
adapter checks is handed to it too (`run`: between two decode steps). (Freeing the other
threads' OpenMP workers instead, with omp_pause_resource_all, hung a decode step's matmul
in a barrier: not that.) GPU work does not care which thread launches it.
"""

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

T = TypeVar("T")


class ModelThread:
    """A daemon thread that runs jobs one after another. `run` waits for a job's result;
    `start` hands it a loop that runs for good and calls `run_pending` between its steps
    (`wake` is how a new job interrupts the loop's idle wait)."""

    def __init__(self, name: str = "model") -> None:
        self.jobs: queue.SimpleQueue[tuple[Callable[[], object], Future]] = queue.SimpleQueue()
        self.wake: Callable[[], None] = lambda: None
        self.thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self.thread.start()

    def run(self, job: Callable[[], T]) -> T:
        """`job()` on this thread; its result, or its exception raised here."""
        if threading.current_thread() is self.thread:
            return job()
        done: Future = Future()
        self.jobs.put((job, done))
        self.wake()
        return done.result()

    def start(self, loop: Callable[[], None], wake: Callable[[], None]) -> None:
        self.wake = wake
        self.jobs.put((loop, Future()))

    def run_pending(self) -> None:
        """The jobs waiting (from the loop, between its steps)."""
        while True:
            try:
                job, done = self.jobs.get_nowait()
            except queue.Empty:
                return
            _run_into(job, done)

    def _serve(self) -> None:
        while True:
            _run_into(*self.jobs.get())


def _run_into(job: Callable[[], object], done: Future) -> None:
    try:
        done.set_result(job())
    except BaseException as error:  # the caller of run() raises it
        done.set_exception(error)
