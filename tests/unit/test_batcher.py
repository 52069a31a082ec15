"""The batcher's admission policy, drain cut-off and thread start-up, driven directly (no HTTP)."""
import asyncio
import threading

import numpy as np
import pytest

from photoz.service.batcher import Batcher
from photoz.service.errors import Draining, QueueFull


def blocking_infer(release: threading.Event):
    def infer(images, ebv):
        release.wait(10)
        return {"probs": np.full((len(images), 3), 1 / 3)}
    return infer


def run_with_batcher(test, **options):
    """Run ``test(batcher, release)`` inside an event loop with a started batcher whose model blocks."""
    release = threading.Event()

    async def main():
        batcher = Batcher(blocking_infer(release), **{"max_batch_size": 4, "max_queue_delay_s": 0.0,
                                                      "max_queue_objects": 32, "workers": 1, **options})
        batcher.start()
        try:
            return await test(batcher, release)
        finally:
            release.set()
            await batcher.close()

    return asyncio.run(main())


def images(n):
    return np.zeros((n, 5, 64, 64), np.float32), np.zeros(n, np.float32)


def test_capacity_bound_refuses_with_retry_after_and_closes_before_the_body():
    async def test(batcher, release):
        first = asyncio.ensure_future(batcher.submit(*images(4), 10))  # running (blocked in the model)
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(batcher.submit(*images(28), 10))  # fills the queue: 28 of 32
        await asyncio.sleep(0.05)
        assert batcher.admission(4) is None
        refusal = batcher.admission(5, before_body=True)
        assert isinstance(refusal, QueueFull) and refusal.headers()["Connection"] == "close"
        assert int(refusal.headers()["Retry-After"]) >= 1
        with pytest.raises(QueueFull):
            await batcher.submit(*images(5), 10)
        release.set()
        assert len((await first)["probs"]) == 4 and len((await queued)["probs"]) == 28

    run_with_batcher(test)


def test_delay_target_refuses_behind_a_standing_queue_only(monkeypatch):
    async def test(batcher, release):
        batcher.seconds_per_object = 0.05  # measured rate: 20 cutouts/s
        first = asyncio.ensure_future(batcher.submit(*images(4), 10))
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(batcher.submit(*images(8), 10))  # 8 queued: 0.4 s of work ahead
        await asyncio.sleep(0.05)
        assert batcher.expected_wait_s() == pytest.approx(0.4)
        clock = [1000.0]
        monkeypatch.setattr("photoz.service.batcher.time.monotonic", lambda: clock[0])
        batcher._above_since = None
        assert batcher.admission(1) is None  # a burst: above the target only from now on
        clock[0] += 0.3  # still a burst (not yet 2 x 0.2 s)
        assert batcher.admission(1) is None
        clock[0] += 0.2  # above the target for 0.5 s: a standing queue
        small = batcher.admission(1)
        assert isinstance(small, QueueFull) and "0.40 s to start" in str(small)
        assert batcher.admission(8) is None  # its own compute (0.4 s) x 2 covers the wait
        monkeypatch.undo()
        release.set()
        await first
        await queued
        assert batcher.admission(1) is None and not batcher._dropping  # drained: the policy resets

    run_with_batcher(test, max_queue_wait_s=0.2)


def test_drain_cut_off_fails_queued_work_with_the_given_error():
    async def test(batcher, release):
        running = asyncio.ensure_future(batcher.submit(*images(4), 10))
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(batcher.submit(*images(8), 10))
        await asyncio.sleep(0.05)
        assert batcher.abort_queued(Draining("cut off")) == 8 and batcher.queued == 0
        with pytest.raises(Draining, match="cut off"):
            await queued
        release.set()
        assert len((await running)["probs"]) == 4  # work already running finishes

    run_with_batcher(test)


def test_every_inference_thread_starts_with_the_batcher():
    async def test(batcher, release):
        names = {t.name for t in threading.enumerate() if t.name.startswith("photoz-infer")}
        assert len(names) == 3
        return True

    assert run_with_batcher(test, workers=3)


def test_admitted_requests_count_against_the_queue_until_their_cutouts_are_queued():
    """A request let in from its headers reserves its cutouts while its body is read: an empty queue does not
    admit a whole storm's bodies at once. Releasing is idempotent, and the queue then counts the cutouts."""
    async def test(batcher, release):
        first = batcher.reserve(20)
        assert batcher.incoming == 20 and batcher.admission(12) is None
        assert isinstance(batcher.admission(13, before_body=True), QueueFull)  # 20 incoming + 13 > 32
        second = batcher.reserve(12)
        assert isinstance(batcher.admission(1), QueueFull)
        first.release()
        first.release()  # twice: counted once
        assert batcher.incoming == 12
        second.release()
        work = asyncio.ensure_future(batcher.submit(*images(4), 10))
        await asyncio.sleep(0.05)
        assert batcher.incoming == 0
        release.set()
        assert len((await work)["probs"]) == 4

    run_with_batcher(test)
