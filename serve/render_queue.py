"""One renderer per replica, fed with everything that queued up while it was busy.

Serve's ``@serve.batch`` forms a batch from the requests that arrive within ``batch_wait_timeout_s``
of the first one, and forms the next batch while the previous one still renders. Under closed-loop
load requests come back in a trickle, so those batches are small. A diffusion render takes far
longer than the wait, so the replica gets its throughput from the render instead: every batch
Serve hands over joins this queue, and each time the renderer frees up it takes all compatible
queued work (same adapter, same sampling settings, up to ``max_images``) as one pipeline call.
With nothing queued a request starts at once, so batching costs no latency at low load.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

Job = TypeVar("Job")
Result = TypeVar("Result")


@dataclass
class _Entry(Generic[Job, Result]):
    adapter: object
    job: Job
    future: asyncio.Future[Result]


class RenderQueue(Generic[Job, Result]):
    """Coalesces queued jobs into pipeline calls; ``render(adapter, jobs)`` runs in a worker thread.

    ``key(job)`` says which jobs may share a call (equal sampling settings); ``size(job)`` is a job's
    number of images, and one call renders at most ``max_images`` of them (a larger job goes alone).
    """

    def __init__(self, render: Callable[[object, list[Job]], Sequence[Result]], key: Callable[[Job], Hashable],
                 size: Callable[[Job], int], max_images: int) -> None:
        self.render, self.key, self.size, self.max_images = render, key, size, max_images
        self.pending: list[_Entry[Job, Result]] = []
        self.draining = False
        self.calls = 0  # pipeline calls made (for tests and logs)
        self.images = 0  # images rendered

    async def submit(self, adapter: object, jobs: Sequence[Job]) -> list[Result]:
        """The result of each job, in order, once rendered."""
        loop = asyncio.get_running_loop()
        entries = [_Entry(adapter, job, loop.create_future()) for job in jobs]
        self.pending.extend(entries)
        if not self.draining:
            self.draining = True
            loop.create_task(self._drain())
        return list(await asyncio.gather(*(entry.future for entry in entries)))

    def _take(self) -> list[_Entry[Job, Result]]:
        """The oldest entry and every later one that can share its pipeline call."""
        first = self.pending[0]
        taken, kept, images = [], [], 0
        for entry in self.pending:
            fits = images + self.size(entry.job) <= self.max_images or not taken
            if entry.adapter is first.adapter and self.key(entry.job) == self.key(first.job) and fits:
                taken.append(entry)
                images += self.size(entry.job)
            else:
                kept.append(entry)
        self.pending = kept
        return taken

    async def _drain(self) -> None:
        try:
            while self.pending:
                taken = [entry for entry in self._take() if not entry.future.done()]  # done: cancelled by caller
                if not taken:
                    continue
                try:
                    results = await asyncio.to_thread(self.render, taken[0].adapter, [e.job for e in taken])
                    outcomes = list(zip(taken, results, strict=True))
                except Exception as err:  # noqa: BLE001 - handed to the waiting requests, not swallowed
                    for entry in taken:
                        if not entry.future.done():
                            entry.future.set_exception(err)
                    continue
                self.calls += 1
                self.images += sum(self.size(e.job) for e in taken)
                for entry, result in outcomes:
                    if not entry.future.done():
                        entry.future.set_result(result)
        finally:
            self.draining = False
