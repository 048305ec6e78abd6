"""A bounded queue in front of a fixed number of generation workers, and one generation run on a worker.

The event loop never generates: a request takes a worker slot (waiting in the queue if all are busy, refused at
once if the queue is full, refused after `queue_timeout_s` of waiting), then its generation runs on one of the
pool's threads and hands text back to the loop piece by piece. onnxruntime releases the GIL while a graph runs,
so workers generate in parallel; each holds its slot until its thread is done, so at most `workers` run at once.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from edge_lora.runtime.generate import Generator
from edge_lora.runtime.sampling import SamplingConfig
from edge_lora.runtime.serve.metrics import ServerMetrics
from edge_lora.runtime.serve.schema import APIError


class WorkerPool:
    """`workers` generation threads behind a queue of at most `queue_size` waiting requests.

    Slots are handed from a finished request straight to the longest-waiting one, in the event loop's thread,
    so the counts need no lock.
    """

    def __init__(self, workers: int, queue_size: int, queue_timeout_s: float, retry_after_s: int):
        self.workers, self.queue_size = workers, queue_size
        self.queue_timeout_s, self.retry_after_s = queue_timeout_s, retry_after_s
        self.free = workers
        self._waiting: deque[asyncio.Future] = deque()
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="edge-lora-generate")
        self._running: set[Job] = set()
        self.closed = False

    @property
    def queue_depth(self) -> int:
        return sum(not f.done() for f in self._waiting)

    async def acquire(self) -> None:
        """Take a worker slot, waiting in the queue for one; raises APIError 429 or 503."""
        if self.closed:
            raise APIError(
                503, "the server is shutting down — retry against another instance or later", "shutting_down"
            )
        if self.free > 0 and not self._waiting:
            self.free -= 1
            return
        if self.queue_depth >= self.queue_size:
            raise APIError(
                429,
                f"all {self.workers} workers are busy and {self.queue_size} requests are queued — "
                f"retry after {self.retry_after_s} s",
                "queue_full",
                headers={"Retry-After": str(self.retry_after_s)},
            )
        slot = asyncio.get_running_loop().create_future()
        self._waiting.append(slot)
        try:
            async with asyncio.timeout(self.queue_timeout_s):
                await slot
        except BaseException as e:
            if slot.done() and not slot.cancelled():  # the slot arrived as the wait ended: pass it on
                self.release()
            else:
                slot.cancel()
            if isinstance(e, TimeoutError):
                raise APIError(
                    503,
                    f"no worker was free within {self.queue_timeout_s:g} s — retry later, or start "
                    "the server with more --workers or a longer --queue-timeout",
                    "queue_timeout",
                    headers={"Retry-After": str(self.retry_after_s)},
                ) from None
            raise
        finally:
            if slot in self._waiting and slot.done():
                self._waiting.remove(slot)

    def release(self) -> None:
        while self._waiting:
            slot = self._waiting.popleft()
            if not slot.done():
                slot.set_result(None)
                return
        self.free += 1

    def start(self, job: Job) -> asyncio.Future:
        """Run `job` on a worker thread; the slot taken by acquire() is released when the thread is done."""
        self._running.add(job)
        done = asyncio.get_running_loop().run_in_executor(self._executor, job.run)

        def finished(_):
            self._running.discard(job)
            self.release()

        done.add_done_callback(finished)
        return done

    def close(self) -> None:
        """Refuse new requests, stop every running generation at its next token, and wait for the threads."""
        self.closed = True
        for job in list(self._running):
            job.cancel()
        for slot in self._waiting:
            slot.cancel()
        self._executor.shutdown(wait=True, cancel_futures=True)


@dataclass(frozen=True)
class Piece:
    """Text that is final, from one or more tokens."""

    text: str
    """Decoded text, never part of a stop string."""


@dataclass(frozen=True)
class Finish:
    """The end of a generation."""

    reason: str
    """"stop" (end-of-sequence token or stop string), "length" (max_tokens reached) or "cancelled"."""
    completion_tokens: int
    """New tokens generated, the stopping one included."""


@dataclass(eq=False)  # each job is itself: a member of the pool's set of running jobs
class Job:
    """One generation, run by a worker thread; its pieces and its end arrive in `events` on the event loop."""

    generator: Generator
    """A view with the request's adapter active."""
    prompt_ids: list[int]
    sampling: SamplingConfig
    model: str
    """Name the request asked for, for the metrics."""
    metrics: ServerMetrics
    arrived: float
    """time.perf_counter() when the request arrived: time to first token counts the queue wait too."""
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Stop at the next token (the client left, or the server is stopping)."""
        self._cancelled.set()

    def _emit(self, event: Piece | Finish | Exception) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def run(self) -> None:
        # The generator decides the end (end-of-sequence or stop tokens, stop strings, length) and the text each
        # token lets out; the job adds cancellation, metrics and the hand-over to the event loop.
        count, reason = 0, "length"
        running = self.metrics.active_generations.labels(self.model)
        running.inc()
        try:
            for step in self.generator.steps(self.prompt_ids, self.sampling):
                count += 1
                self.metrics.observe_token(
                    self.model,
                    first=count == 1,
                    seconds=time.perf_counter() - self.arrived if count == 1 else step.seconds,
                )
                if self._cancelled.is_set():
                    reason = "cancelled"
                    break
                if step.text:
                    self._emit(Piece(step.text))
                reason = step.finish_reason or reason
            self._emit(Finish(reason, count))
        except Exception as e:  # reported to the client as a 500 or a stream error; the server keeps running
            self._emit(e)
        finally:
            running.dec()
