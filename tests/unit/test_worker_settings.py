"""How PHOTOZ_WORKERS divides the server's limits among its worker processes, and how many it starts."""
import pytest

from photoz.service.settings import Settings
from photoz.service.workers import worker_settings


def test_each_worker_holds_its_share_so_the_server_holds_what_the_settings_say(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    settings = Settings(max_queue_objects=8192, max_inflight_body_mb=256, max_refusals_per_s=200, flag_workers=8,
                        inference_workers=2)
    share = worker_settings(settings, 4)
    assert (share.workers, share.max_queue_objects, share.max_inflight_body_mb) == (1, 2048, 64)
    assert (share.max_refusals_per_s, share.flag_workers) == (50, 2)
    # a quarter of the 16 cores each; on a CPU one batch at a time with all four, on a GPU two with two each
    assert (share.inference_workers, share.intra_op_threads, share.solo_threads) == (1, 4, 4)
    on_gpu = worker_settings(settings, 4, gpu=True)
    assert (on_gpu.inference_workers, on_gpu.intra_op_threads) == (2, 2)
    pinned = worker_settings(settings.model_copy(update={"intra_op_threads": 6, "solo_threads": 3}), 4)
    assert (pinned.intra_op_threads, pinned.solo_threads) == (6, 3)  # set by the operator: kept
    assert worker_settings(Settings(flag_workers=1, max_queue_objects=1), 3).flag_workers == 1  # never 0
    assert worker_settings(Settings(flag_workers=1, max_queue_objects=1), 3).max_queue_objects == 1


@pytest.mark.parametrize(("workers", "cores", "gpu", "expected"),
                         [(0, 2, False, 1), (0, 16, False, 1), (0, 16, True, 4), (0, 64, True, 4), (0, 4, True, 1),
                          (3, 2, False, 3), (2, 16, True, 2)])
def test_auto_is_one_on_a_cpu_and_enough_to_feed_a_gpu(monkeypatch, workers, cores, gpu, expected):
    monkeypatch.setattr("os.cpu_count", lambda: cores)
    assert Settings(workers=workers).worker_count(gpu=gpu) == expected
