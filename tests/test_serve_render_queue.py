"""The replica's RenderQueue: what waits while the renderer is busy goes out in one call."""

from __future__ import annotations

import asyncio
import threading

import pytest

from serve.render_queue import RenderQueue


class Renderer:
    """Records each call's jobs; the first call blocks until released, so work piles up behind it."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, list[tuple[str, int]]]] = []
        self.release = threading.Event()

    def __call__(self, adapter: object, jobs: list[tuple[str, int]]) -> list[str]:
        if not self.calls:
            self.release.wait(5)
        self.calls.append((adapter, list(jobs)))
        if any(name == "boom" for name, _ in jobs):
            raise RuntimeError("render failed")
        return [f"{adapter}:{name}" for name, _ in jobs]


def queue(renderer: Renderer, max_images: int = 4) -> RenderQueue:
    return RenderQueue(renderer, key=lambda job: job[0][0], size=lambda job: job[1], max_images=max_images)


async def _pile_up(q: RenderQueue, renderer: Renderer, submissions: list[tuple[str, list]]) -> list:
    """Submit one job (which blocks the renderer), then ``submissions``, then release the renderer."""
    first = asyncio.create_task(q.submit("A", [("x0", 1)]))
    await asyncio.sleep(0.05)  # the first call is now rendering
    tasks = [asyncio.create_task(q.submit(adapter, jobs)) for adapter, jobs in submissions]
    await asyncio.sleep(0.05)
    renderer.release.set()
    return [await first, *await asyncio.gather(*tasks, return_exceptions=True)]


def test_queued_work_with_equal_settings_shares_one_call_up_to_max_images():
    renderer = Renderer()
    q = queue(renderer, max_images=4)
    results = asyncio.run(_pile_up(q, renderer, [
        ("A", [("x1", 1), ("x2", 2)]),  # same adapter and key "x": joins
        ("A", [("y1", 1)]),             # other settings: its own call
        ("B", [("x3", 1)]),             # other adapter: its own call
        ("A", [("x4", 1), ("x5", 1)]),  # x4 fits the 4 images of the first merged call, x5 waits
    ]))
    assert results == [["A:x0"], ["A:x1", "A:x2"], ["A:y1"], ["B:x3"], ["A:x4", "A:x5"]]
    assert [(a, [name for name, _ in jobs]) for a, jobs in renderer.calls] == [
        ("A", ["x0"]), ("A", ["x1", "x2", "x4"]), ("A", ["y1"]), ("B", ["x3"]), ("A", ["x5"])]
    assert (q.calls, q.images, q.draining, q.pending) == (5, 8, False, [])


def test_a_failed_call_fails_its_requests_only():
    renderer = Renderer()
    q = queue(renderer)
    results = asyncio.run(_pile_up(q, renderer, [("A", [("boom", 1)]), ("B", [("x1", 1)])]))
    assert isinstance(results[1], RuntimeError)
    assert results[0] == ["A:x0"] and results[2] == ["B:x1"]


def test_a_job_larger_than_max_images_renders_alone():
    renderer = Renderer()
    renderer.release.set()
    q = queue(renderer, max_images=2)
    assert asyncio.run(q.submit("A", [("x1", 3)])) == ["A:x1"]


def test_idle_queue_renders_at_once():
    renderer = Renderer()
    renderer.release.set()
    q = queue(renderer)

    async def timed() -> float:
        loop = asyncio.get_running_loop()
        start = loop.time()
        await q.submit("A", [("x1", 1)])
        return loop.time() - start

    assert asyncio.run(timed()) < 0.5
    with pytest.raises(ValueError):  # zip(strict=True): a renderer returning too few results is an error
        bad = RenderQueue(lambda adapter, jobs: [], key=lambda job: 0, size=lambda job: 1, max_images=4)
        asyncio.run(bad.submit("A", [("x1", 1)]))
