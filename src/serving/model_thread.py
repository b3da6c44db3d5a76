"""The one thread that does the served model's CPU-parallel work: loading it, then decoding.

PyTorch's CPU kernels run on OpenMP, and OpenMP gives every thread that starts parallel work
a team of worker threads of its own. Once two long-lived threads each have one (the thread
that loaded the model and the scheduler's), their workers outnumber the cores and no longer
wait spinning between kernels: each small parallel kernel then pays for waking its workers.
Measured on a 2-core CPU (torch 2.13): one decode step of the tiny model took 3.4 ms on the
thread that had loaded the model and 10.6 ms on another thread (100M model: 20.5 against
33.6 ms); loaded and decoded on the same thread, 3.3 and 20.6 ms. So the model is loaded on
this thread, and the scheduler's loop runs on it after (src/serving/scheduler.py). Threads
that do some CPU work of their own (setup on Cog's thread, an adapter's checks on a
request's) give their team back when done (`release_openmp_team`, OpenMP 5's
omp_pause_resource_all, which frees the calling thread's workers only: measured, the model
thread's kernels keep their speed). GPU work does not care which thread launches it.
"""

import ctypes
import functools
import glob
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

import torch

from src.log import log

T = TypeVar("T")
OMP_PAUSE_SOFT = 1


@functools.cache
def _omp_pause() -> Callable[[int], int] | None:
    """omp_pause_resource_all of the OpenMP runtime torch's kernels run on, if it has one."""
    candidates = [None]  # the process's global symbols, then torch's bundled runtime
    candidates += sorted(
        glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "lib*omp*"))
    )
    for path in candidates:
        try:
            return ctypes.CDLL(path).omp_pause_resource_all
        except (OSError, AttributeError):
            continue
    log("note: no OpenMP runtime with omp_pause_resource_all found: CPU threads other than "
        "the model's keep their OpenMP workers (a CPU decode step may be slower)")  # fmt: skip
    return None


def release_openmp_team() -> bool:
    """Free the OpenMP workers of the calling thread (they come back if it computes again);
    False where the runtime has no way to (said once in the log)."""
    pause = _omp_pause()
    return pause is not None and pause(OMP_PAUSE_SOFT) == 0


class ModelThread:
    """A daemon thread that runs jobs one after another: `run` waits for a job's result,
    `start` hands it a job that never returns (the decode loop)."""

    def __init__(self, name: str = "model") -> None:
        self.jobs: queue.SimpleQueue[tuple[Callable[[], object], Future]] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self.thread.start()

    def run(self, job: Callable[[], T]) -> T:
        """`job()` on this thread; its result, or its exception raised here."""
        if threading.current_thread() is self.thread:
            return job()
        done: Future = Future()
        self.jobs.put((job, done))
        return done.result()

    def start(self, loop: Callable[[], None]) -> None:
        self.jobs.put((loop, Future()))

    def _serve(self) -> None:
        while True:
            job, done = self.jobs.get()
            try:
                done.set_result(job())
            except BaseException as error:  # the caller of run() raises it
                done.set_exception(error)
