"""The batcher's admission policy, drain cut-off and thread start-up, driven directly (no HTTP)."""
import asyncio
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from photoz.model.isolation import ROW_ERRORS
from photoz.service.batcher import Batcher, BatchStats
from photoz.service.errors import Draining, QueueFull
from tests.helpers import until


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
        await until(lambda: batcher._running and not batcher.queued)
        queued = asyncio.ensure_future(batcher.submit(*images(28), 10))  # fills the queue: 28 of 32
        await until(lambda: batcher.queued == 28)
        assert batcher.admission(4) is None
        refusal = batcher.admission(5, before_body=True)
        assert isinstance(refusal, QueueFull) and refusal.headers()["Connection"] == "close"
        assert int(refusal.headers()["Retry-After"]) >= 1
        with pytest.raises(QueueFull):
            await batcher.submit(*images(5), 10)
        release.set()
        assert len((await first)["probs"]) == 4 and len((await queued)["probs"]) == 28

    run_with_batcher(test)


def test_delay_target_refuses_behind_a_standing_queue_only():
    """The admission's standing-queue timer on an injected clock: no sleeps, no elapsed-time windows."""
    clock = [1000.0]

    async def test(batcher, release):
        batcher.seconds_per_object = 0.05  # measured rate: 20 cutouts/s
        first = asyncio.ensure_future(batcher.submit(*images(4), 10))
        await until(lambda: batcher._running and not batcher.queued, "the first batch in the (blocked) model")
        queued = asyncio.ensure_future(batcher.submit(*images(8), 10))  # 8 queued: 0.4 s of work ahead
        await until(lambda: batcher.queued == 8, "8 cutouts queued")
        assert batcher.expected_wait_s() == pytest.approx(0.4)
        assert batcher.admission(1) is None  # a burst: above the target only from now on
        clock[0] += 0.3  # still a burst (not yet 2 x 0.2 s)
        assert batcher.admission(1) is None
        clock[0] += 0.2  # above the target for 0.5 s: a standing queue
        small = batcher.admission(1)
        assert isinstance(small, QueueFull) and "0.40 s to start" in str(small)
        assert batcher.admission(8) is None  # its own compute (0.4 s) x 2 covers the wait
        release.set()
        await first
        await queued
        assert batcher.admission(1) is None and not batcher._dropping  # drained: the policy resets

    run_with_batcher(test, max_queue_wait_s=0.2, clock=lambda: clock[0])


def test_a_burst_is_admitted_up_to_what_drains_in_time_and_no_further():
    """At one instant (the clock does not move), single cutouts are admitted while the work ahead of them starts
    within BURST_TARGETS x the target, then refused, though the queue is not yet a standing one; a request large
    enough to be worth its wait is still let in; once the burst has gone, the next is admitted again."""
    from photoz.service.batcher import BURST_TARGETS

    async def test(batcher, release):
        batcher.seconds_per_object = 0.05  # 20 cutouts/s: the target (0.2 s) is 4 queued cutouts
        admitted = []
        while (refusal := batcher.admission(1, before_body=True)) is None and len(admitted) < 100:
            admitted.append(batcher.reserve(1))
        assert len(admitted) == BURST_TARGETS * 4 + 1  # the last one admitted starts at 3 x the target
        assert isinstance(refusal, QueueFull) and "0.65 s to start" in str(refusal) and not batcher._dropping
        assert batcher.admission(8) is None  # 8 cutouts (0.4 s): twice their compute covers the wait
        for reservation in admitted:
            reservation.release()
        assert batcher.admission(1) is None

    run_with_batcher(test, max_queue_wait_s=0.2, clock=lambda: 1000.0)


def test_drain_cut_off_fails_queued_work_with_the_given_error():
    async def test(batcher, release):
        running = asyncio.ensure_future(batcher.submit(*images(4), 10))
        await until(lambda: batcher._running and not batcher.queued)
        queued = asyncio.ensure_future(batcher.submit(*images(8), 10))
        await until(lambda: batcher.queued == 8)
        assert batcher.abort_queued(Draining("cut off")) == 8 and batcher.queued == 0
        with pytest.raises(Draining, match="cut off"):
            await queued
        release.set()
        assert len((await running)["probs"]) == 4  # work already running finishes

    run_with_batcher(test)


def test_every_inference_thread_starts_with_the_batcher():
    async def test(batcher, release):
        threads = [t for t in threading.enumerate() if t.name.startswith("photoz-infer")]
        assert len(threads) == 3
        if sys.platform == "linux":  # the operating system knows them by name too (top -H, /proc, py-spy)
            comms = {Path(f"/proc/self/task/{t.native_id}/comm").read_text().strip() for t in threads}
            assert comms == {t.name for t in threads}
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
        await until(lambda: batcher._running)
        assert batcher.incoming == 0
        release.set()
        assert len((await work)["probs"]) == 4

    run_with_batcher(test)


@pytest.mark.parametrize("bulk", [None, 8])
def test_large_requests_share_bulk_batches_and_small_ones_never_join_them(bulk):
    """Pieces of requests larger than max_batch_size (4) are batched up to max_bulk_batch_size (8); a small
    request's piece never shares a batch beyond 4 cutouts, so single cutouts keep small batches; each request
    gets its own rows back. Without a bulk size, every batch stays within 4."""
    release, calls = threading.Event(), []

    def infer(images, ebv):
        release.wait(10)
        calls.append(len(images))
        return {"probs": np.repeat(ebv[:, None], 3, axis=1)}

    async def main():
        batcher = Batcher(infer, max_batch_size=4, max_queue_delay_s=0.0, max_queue_objects=64, workers=1,
                          max_bulk_batch_size=bulk)
        batcher.start()
        try:
            first = asyncio.ensure_future(batcher.submit(*images(4), 10))
            await until(lambda: batcher._running and not batcher.queued, "the first batch in the (blocked) model")
            sizes = [12, 1, 3, 10]  # queued in this order: bulk, small, small, bulk (the last piece of 2)
            jobs = []
            for k, n in enumerate(sizes):
                jobs.append(asyncio.ensure_future(batcher.submit(images(n)[0], np.full(n, k, np.float32), 10)))
                await until(lambda k=k: batcher.queued == sum(sizes[:k + 1]), f"request {k} queued")
            release.set()
            await first
            return await asyncio.wait_for(asyncio.gather(*jobs), 10)
        finally:
            release.set()
            await batcher.close()

    done = asyncio.run(main())
    assert [d["probs"][:, 0].tolist() for d in done] == [[k] * n for k, n in enumerate([12, 1, 3, 10])]
    # 12 = 8 + 4 (the next piece is small: the bulk batch stops), then 1 + 3, then 10 = 8 + 2
    assert calls == ([4, 8, 4, 4, 8, 2] if bulk else [4, 4, 4, 4, 4, 4, 4, 2])


def test_requests_one_at_a_time_skip_the_queue_delay_and_requests_together_wait_for_a_batch():
    """The queue delay is for filling a batch: with nothing in flight a lone request goes to the model at once
    (the clock does not reach its hour-long delay); pieces arriving while it runs wait and go together as one full
    batch; after that batch of four, an idle engine waits the delay again for others to join a newcomer."""
    release, calls, now = threading.Event(), [], [0.0]

    def infer(images, ebv):
        calls.append(len(images))
        release.wait(10)
        return {"probs": np.repeat(ebv[:, None], 3, axis=1)}

    async def main():
        batcher = Batcher(infer, max_batch_size=4, max_queue_delay_s=3600.0, max_queue_objects=64, workers=2,
                          clock=lambda: now[0])  # stands still unless moved: only a full batch ends a wait
        batcher.start()
        try:
            lone = asyncio.ensure_future(batcher.submit(*images(1), 10))
            await until(lambda: calls == [1], "the lone piece in the model with no wait")
            later = []
            for k in range(3):  # a slot is free, but a batch is in flight: these wait to fill a batch
                later.append(asyncio.ensure_future(batcher.submit(*images(1), 10)))
                await until(lambda k=k: batcher.queued == k + 1, f"piece {k} queued")
            assert calls == [1]
            later.append(asyncio.ensure_future(batcher.submit(*images(1), 10)))  # the fourth fills the batch
            await until(lambda: calls == [1, 4], "one full batch of the four")
            release.set()
            answers = await asyncio.wait_for(asyncio.gather(lone, *later), 10)
            await until(lambda: not batcher._running, "the engine idle")
            newcomer = asyncio.ensure_future(batcher.submit(*images(1), 1e5))  # requests came together: it waits
            await until(lambda: batcher.queued == 1, "the newcomer queued")
            await asyncio.sleep(0.05)
            assert calls == [1, 4]
            now[0] = 3601.0  # its delay has passed; the next arrival wakes the loop, and the two go together
            answers += await asyncio.wait_for(asyncio.gather(newcomer, batcher.submit(*images(1), 1e5)), 10)
            return answers
        finally:
            release.set()
            await batcher.close()

    assert [len(d["probs"]) for d in asyncio.run(main())] == [1] * 7
    assert calls == [1, 4, 2]


def _finishing_batcher(infer, finish, **options):
    return Batcher(infer, **{"max_batch_size": 4, "max_queue_delay_s": 0.0, "max_queue_objects": 64, "workers": 1,
                             "finish": finish, "finish_workers": 1, **options})


def test_the_finish_stage_runs_on_its_own_thread_while_the_model_takes_the_next_batch():
    """A batch being finished (the quality flags) does not hold the model: the next batch's model call starts
    while the first is still finishing, and each caller gets its own rows with the finish's additions."""
    calls: list[str] = []
    finishing = threading.Event()
    second_model_call = threading.Event()

    def infer(images, ebv):
        calls.append("infer")
        if calls.count("infer") == 2:
            second_model_call.set()
        return {"probs": np.repeat(ebv[:, None], 3, axis=1)}

    def finish(images, ebv, outputs):
        calls.append("finish")
        finishing.set()
        second_model_call.wait(10)  # blocks until the model has run the next batch
        return {**outputs, "flag_bits": (ebv * 10).astype(np.uint32), "thread": np.array([threading.get_ident()] *
                                                                                          len(ebv))}

    async def main():
        batcher = _finishing_batcher(infer, finish)
        batcher.start()
        try:
            first = asyncio.ensure_future(batcher.submit(images(4)[0], np.full(4, 0.1, np.float32), 10))
            await asyncio.get_running_loop().run_in_executor(None, finishing.wait, 10)
            second = asyncio.ensure_future(batcher.submit(images(2)[0], np.full(2, 0.3, np.float32), 10))
            a, b = await asyncio.wait_for(first, 10), await asyncio.wait_for(second, 10)
        finally:
            await batcher.close()
        return a, b

    a, b = asyncio.run(main())
    assert second_model_call.is_set() and calls.index("finish") < len(calls) - 1  # infer #2 ran mid-finish
    np.testing.assert_allclose(a["probs"], 0.1) and np.testing.assert_allclose(b["probs"], 0.3)
    assert a["flag_bits"].tolist() == [1] * 4 and b["flag_bits"].tolist() == [3] * 2
    assert a["thread"][0] != threading.get_ident()


def test_a_failing_finish_fails_its_batch_only_and_a_slow_one_holds_the_model_back():
    """An exception in the finish stage goes to that batch's callers; with one finishing thread, at most
    FINISH_BACKLOG_BATCHES batches wait for it, and the model waits beyond that (no unbounded pile of finished
    model outputs); the batches that waited are finished together, in one call."""
    from photoz.service.batcher import FINISH_BACKLOG_BATCHES

    release = threading.Event()
    model_calls, finish_calls = [], []

    def infer(images, ebv):
        model_calls.append(len(images))
        return {"probs": np.zeros((len(images), 3)) + ebv[:, None]}

    def finish(images, ebv, outputs):
        if ebv[0] < 0:
            raise RuntimeError("flags failed")
        finish_calls.append(len(images))
        release.wait(10)
        return outputs

    n_jobs = FINISH_BACKLOG_BATCHES + 3

    async def main():
        batcher = _finishing_batcher(infer, finish)
        batcher.start()
        try:
            bad = asyncio.ensure_future(batcher.submit(images(1)[0], np.full(1, -1.0, np.float32), 10))
            with pytest.raises(RuntimeError, match="flags failed"):
                await asyncio.wait_for(bad, 10)
            jobs = [asyncio.ensure_future(batcher.submit(images(4)[0], np.full(4, k / 100, np.float32), 10))
                    for k in range(n_jobs)]
            # wait (on a loaded machine, threads start late) until the bound's batches have run the model, then a
            # while longer: a broken bound would let the others run too
            deadline = time.monotonic() + 10
            while len(model_calls) - 1 < FINISH_BACKLOG_BATCHES + 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.3)
            held = len(model_calls) - 1  # model calls of the batches while the finish is blocked
            release.set()
            done = await asyncio.wait_for(asyncio.gather(*jobs), 10)
        finally:
            release.set()
            await batcher.close()
        return held, done

    held, done = asyncio.run(main())
    # the bound's batches within the finishing stage (one finishing, the others waiting for its thread) and one
    # more that has run the model and holds it until there is room: the rest wait unrun
    assert held == FINISH_BACKLOG_BATCHES + 1
    assert [len(d["probs"]) for d in done] == [4] * n_jobs
    # each caller gets its own rows back, whichever call finished them
    assert [float(d["probs"][0, 0]) for d in done] == pytest.approx([k / 100 for k in range(n_jobs)])
    # the first batch finished alone; those that waited behind it were finished together
    assert sum(finish_calls) == 4 * n_jobs and len(finish_calls) < n_jobs and max(finish_calls) > 4


def poisoned_infer(calls):
    """A model that raises on any batch holding a cutout whose first pixel is negative, else maps each cutout to
    its own PDF (its ebv in the first bin: rows are told apart)."""
    def infer(images, ebv):
        calls.append(len(images))
        if (images[:, 0, 0, 0] < 0).any():
            raise RuntimeError("GatherElements: out of range value in index tensor")
        probs = np.zeros((len(images), 3))
        probs[:, 0], probs[:, 1] = ebv, 1 - ebv
        return {"probs": probs, "flag_bits": np.arange(len(images), dtype=np.uint32)}
    return infer


def test_a_failed_model_call_is_bisected_and_only_its_culprit_fails(caplog):
    """Four requests share one batch of 16; one cutout of one request breaks the model: every other cutout gets
    its own answer, the culprit comes back NaN with its error, the bisection is counted and logged once."""
    calls, isolated = [], []

    async def main():
        batcher = Batcher(poisoned_infer(calls), max_batch_size=16, max_queue_delay_s=0.2, max_queue_objects=64,
                          stats=BatchStats(on_isolated=isolated.append))
        batcher.start()
        try:
            requests = []
            for r in range(4):
                imgs = np.zeros((4, 5, 64, 64), np.float32)
                ebv = np.linspace(0.1, 0.4, 4).astype(np.float32) + r
                if r == 2:
                    imgs[1, 0, 0, 0] = -1.0
                requests.append(asyncio.ensure_future(batcher.submit(imgs, ebv, 10, request_id=f"req-{r}")))
            return await asyncio.wait_for(asyncio.gather(*requests), 10)
        finally:
            await batcher.close()

    with caplog.at_level("WARNING", logger="photoz.service"):
        answers = asyncio.run(main())
    assert calls[0] == 16  # one batch for all four requests
    for r, out in enumerate(answers):
        expected_ebv = np.linspace(0.1, 0.4, 4).astype(np.float32) + r
        errors = out.get(ROW_ERRORS, np.full(4, None, object))
        for row in range(4):
            if (r, row) == (2, 1):
                assert np.isnan(out["probs"][row]).all() and "failed on this cutout alone" in errors[row]
                assert "RuntimeError" in errors[row]
            else:
                assert errors[row] is None and out["probs"][row, 0] == pytest.approx(expected_ebv[row])
    assert isolated == [1]
    assert len(calls) <= 1 + 2 * 4  # the full batch, then two halves per level down to the culprit: 2 log2(16)
    warnings = [r.getMessage() for r in caplog.records if "bisected" in r.getMessage()]
    assert len(warnings) == 1 and "req-2" in warnings[0] and "'req-2': [1]" in warnings[0]


def test_a_model_that_fails_on_everything_fails_the_batch_not_the_objects():
    """When every cutout fails alone and a blank probe cutout fails too, the engine is broken: the batch's callers
    get its error (a 500), not a rejection of their cutouts."""
    def broken(images, ebv):
        raise RuntimeError("CUDA error: device lost")

    async def main():
        batcher = Batcher(broken, max_batch_size=8, max_queue_delay_s=0.0, max_queue_objects=64)
        batcher.start()
        try:
            with pytest.raises(RuntimeError, match="device lost"):
                await asyncio.wait_for(batcher.submit(*images(3), 10), 10)
        finally:
            await batcher.close()

    asyncio.run(main())


def test_a_lone_culprit_is_rejected_when_the_engine_is_healthy():
    """A one-cutout batch that fails while a blank cutout runs: the cutout is the culprit, not the engine."""
    calls = []

    async def main():
        batcher = Batcher(poisoned_infer(calls), max_batch_size=8, max_queue_delay_s=0.0, max_queue_objects=64)
        batcher.start()
        try:
            imgs, ebv = images(1)
            imgs[0, 0, 0, 0] = -1.0
            return await asyncio.wait_for(batcher.submit(imgs, ebv, 10), 10)
        finally:
            await batcher.close()

    out = asyncio.run(main())
    assert calls == [1, 1]  # the cutout, then the probe
    assert np.isnan(out["probs"]).all() and "alone" in out[ROW_ERRORS][0]
