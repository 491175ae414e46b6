"""Dynamic batching: requests wait in a queue, one worker thread turns them into ``generate`` calls.

The worker takes the oldest request, waits up to ``window_s`` for more (never past ``max_batch``), and runs them
as one :func:`~vlweave.serve.generation.generate_batch` (which splits them by sampling setting).  The model is only
ever touched by this thread, so the HTTP side never blocks on it and no two ``generate`` calls race.  A failing
batch is retried one request at a time, so one bad request cannot fail the others; an error is handed to its own
request only.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from vlweave.serve.generation import Completion, FeatureLRU, Prompt, generate_batch

log = logging.getLogger("vlweave.serve")


@dataclass
class _Job:
    prompt: Prompt
    future: Future = field(default_factory=Future)
    streamed: bool = False  # text already went out: a retry would send it twice

    def __post_init__(self) -> None:
        callback = self.prompt.on_text
        if callback is not None:
            def on_text(text: str) -> None:
                self.streamed = True
                callback(text)

            self.prompt.on_text = on_text


class Batcher:
    def __init__(self, model, processor, *, max_batch: int = 8, window_s: float = 0.01,
                 features: FeatureLRU | None = None, routing: str | None = None, routing_seed: int = 0) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model, self.processor, self.features = model, processor, features
        self.routing, self.routing_seed = routing, routing_seed  # a routed (MoVA) model's mode, or None
        self.max_batch, self.window_s = max_batch, window_s
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self.batches: list[int] = []  # sizes of the generate batches run so far (for tests and the bench)
        self._thread = threading.Thread(target=self._run, name="vlweave-batcher", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, prompt: Prompt) -> Future:
        """Queue a prompt; the future resolves to its :class:`Completion` (or raises its error)."""
        job = _Job(prompt)
        self._queue.put(job)
        return job.future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _collect(self, first: _Job) -> tuple[list[_Job], bool]:
        jobs, deadline = [first], time.monotonic() + self.window_s
        while len(jobs) < self.max_batch:
            left = deadline - time.monotonic()
            try:
                job = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return jobs, True
            jobs.append(job)
        return jobs, False

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                break
            jobs, stop = self._collect(first)
            jobs = [j for j in jobs if j.future.set_running_or_notify_cancel()]
            if not jobs:
                continue
            self.batches.append(len(jobs))
            try:
                results = generate_batch(self.model, self.processor, [j.prompt for j in jobs], self.features,
                                         self.routing, self.routing_seed)
            except Exception:  # noqa: BLE001 -- isolate the failing request(s) below
                log.exception("batch of %d failed; retrying one by one", len(jobs))
                for j in jobs:
                    if j.streamed:
                        j.future.set_exception(RuntimeError("generation failed mid-stream"))
                    else:
                        self._one(j)
                continue
            for j, r in zip(jobs, results):
                j.future.set_result(r)

    def _one(self, job: _Job) -> None:
        try:
            (result,) = generate_batch(self.model, self.processor, [job.prompt], self.features, self.routing,
                                       self.routing_seed)
        except Exception as exc:  # noqa: BLE001 -- reported to this request only
            log.exception("request failed")
            job.future.set_exception(exc)
        else:
            job.future.set_result(result)


__all__ = ["Batcher", "Completion"]
