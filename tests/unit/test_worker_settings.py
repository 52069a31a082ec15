"""How PHOTOZ_WORKERS divides the server's limits among its worker processes, how many it starts, and how they
share connections."""
import asyncio
import socket

import pytest

from photoz.service.settings import Settings
from photoz.service.workers import (
    MAX_DEFER_S,
    NOT_ACCEPTING,
    BalancedAcceptor,
    Listener,
    should_accept,
    worker_settings,
)
from tests.helpers import until


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


@pytest.mark.parametrize(("max_batch", "bulk", "buckets", "expected"),
                         [(8, 0, False, 16), (8, 0, True, 8), (8, 32, True, 32), (8, 4, False, 8), (128, 0, True, 128)])
def test_bulk_batches_are_twice_the_batch_on_a_cpu_and_the_batch_under_shape_buckets(max_batch, bulk, buckets,
                                                                                      expected):
    settings = Settings(max_batch_size=max_batch, max_bulk_batch_size=bulk)
    assert settings.bulk_batch_size(buckets) == expected  # set: kept, never below max_batch_size


def test_a_worker_accepts_while_it_has_the_fewest_connections_or_once_the_fewest_has_left_one_waiting():
    assert should_accept([0, 0], 0, None, 5.0) and should_accept([2, 3, 2], 2, None, 5.0)
    assert not should_accept([1, 0], 0, None, 5.0)
    assert not should_accept([1, 0], 0, 5.0 - MAX_DEFER_S / 2, 5.0)
    assert should_accept([1, 0], 0, 5.0 - MAX_DEFER_S * 1.01, 5.0)
    assert should_accept([7, NOT_ACCEPTING], 0, None, 5.0)  # a worker starting, draining or dead takes nothing


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def balanced_pair(clock):
    """Two acceptors on one listening socket (a descriptor each, as each worker process has), in one event loop,
    with shared counts as the supervisor's."""
    sock = socket.create_server(("127.0.0.1", 0))
    counts = [NOT_ACCEPTING, NOT_ACCEPTING]
    acceptors = [BalancedAcceptor(Listener(s, counts, index), clock) for index, s in enumerate([sock, sock.dup()])]
    taken: list[list[asyncio.Transport]] = [[], []]

    def factory(index):
        class Recorder(asyncio.Protocol):
            def connection_made(self, transport):
                taken[index].append(transport)

            def connection_lost(self, exc):
                acceptors[index].closed()
        return Recorder

    return sock, counts, acceptors, taken, factory


def test_balanced_acceptors_share_connections_and_pass_over_a_busy_worker():
    async def scenario():
        clock = Clock()
        sock, counts, acceptors, taken, factory = balanced_pair(clock)
        port = sock.getsockname()[1]
        await acceptors[0].start(factory(0))
        await acceptors[1].start(factory(1))
        clients = []
        for n in range(1, 7):
            clients.append(socket.create_connection(("127.0.0.1", port)))
            await until(lambda n=n: len(taken[0]) + len(taken[1]) == n, f"connection {n} accepted")
        assert [len(t) for t in taken] == [3, 3] and counts == [3, 3]
        taken[1][0].close()  # worker 1 loses a connection: the next one is its
        await until(lambda: counts == [3, 2], "the closed connection counted")
        clients.append(socket.create_connection(("127.0.0.1", port)))
        await until(lambda: len(taken[1]) == 4, "the next connection at worker 1")
        assert len(taken[0]) == 3
        # worker 1's loop is busy (it stops reading its socket, but its count says it accepts): worker 0 leaves
        # a new connection to it, until it has waited MAX_DEFER_S by the injected clock
        acceptors[1].loop.remove_reader(acceptors[1].listener.sock.fileno())
        counts[1] = 0
        clients.append(socket.create_connection(("127.0.0.1", port)))
        await asyncio.sleep(0.1)
        assert len(taken[0]) == 3 and acceptors[0].deferred_since == clock.now
        clock.now += MAX_DEFER_S * 1.01
        await until(lambda: len(taken[0]) == 4, "worker 0 accepting at last")
        acceptors[0].stop()
        assert counts[0] == NOT_ACCEPTING
        for client in clients:
            client.close()
        for transports in taken:
            for transport in transports:
                transport.close()
        for acceptor in acceptors:
            acceptor.listener.sock.close()

    asyncio.run(scenario())


def test_a_worker_accepts_at_once_when_the_first_workers_barrier_is_broken():
    """The supervisor breaks the first workers' barrier when one of them dies before it: the others then accept at
    once, not after STARTUP_WAIT_S."""
    import threading

    async def scenario():
        sock = socket.create_server(("127.0.0.1", 0))
        barrier = threading.Barrier(2)
        barrier.abort()
        counts = [NOT_ACCEPTING, NOT_ACCEPTING]
        acceptor = BalancedAcceptor(Listener(sock, counts, 0, barrier))
        await asyncio.wait_for(acceptor.start(asyncio.Protocol), 5)
        assert acceptor.accepting and counts[0] == 0
        acceptor.stop()
        sock.close()

    asyncio.run(scenario())
