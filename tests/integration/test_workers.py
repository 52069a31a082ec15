"""Several worker processes on one port (PHOTOZ_WORKERS): one metrics view, a worker killed is replaced while the
others serve, SIGTERM drains them all, and auth and limits hold as with one process. Real `photoz serve`."""
import os
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from photoz.service.live import LiveServer
from tests.helpers import npy_bytes, sky_cutouts


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(p) for p in (task / "children").read_text().split()]
    return sorted(found)


def wait_for(condition, timeout_s=60.0, what="condition", poll_s=0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out waiting for {what}")


def metric_lines(server, name):
    text = httpx.get(server.url + "/metrics", timeout=30).text
    return [line for line in text.splitlines() if line.startswith(name)]


def worker_pids(server, n):
    """The supervisor's n worker processes (the spawn machinery's helper process aside), once all are ready."""
    def ready():
        pids = [p for p in children(server.proc.pid) if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]
        return pids if len(pids) == n and len(metric_lines(server, "photoz_queue_depth{")) == n else None
    return wait_for(ready, what=f"{n} ready workers")


def post(url, images, **params):
    return httpx.post(url + "/v1/predict", content=npy_bytes(images), headers={"Content-Type": "application/x-npy"},
                      params=params, timeout=60)


@pytest.fixture(scope="module")
def two_workers(tiny_bundle, tmp_path_factory):
    srv = LiveServer(tiny_bundle, tmp_path_factory.mktemp("logs") / "workers.log", workers=2, max_batch_size=8,
                     max_queue_wait_ms=10_000, api_keys="sekret", max_body_mb=1)
    yield srv
    srv.stop()


def test_two_workers_answer_on_one_port_with_one_metrics_view(two_workers, tiny_predictor, rng):
    pids = worker_pids(two_workers, 2)
    images = sky_cutouts(rng, 3)
    auth = {"Authorization": "Bearer sekret", "Content-Type": "application/x-npy"}
    before = sum(float(line.split()[-1]) for line in metric_lines(two_workers, 'photoz_requests_total{status="200"}'))
    for _ in range(20):  # a new connection each: the kernel hands them to either worker
        response = httpx.post(two_workers.url + "/v1/predict", content=npy_bytes(images), headers=auth, timeout=60)
        assert response.status_code == 200
        want = tiny_predictor.predict(images, np.zeros(3))
        np.testing.assert_allclose(np.array(response.json()["data"]["pdfs"]), want, atol=1e-6)
    after = sum(float(line.split()[-1]) for line in metric_lines(two_workers, 'photoz_requests_total{status="200"}'))
    assert after - before == 20  # every worker's requests, whichever worker rendered /metrics
    assert {line.split('pid="')[1].split('"')[0] for line in metric_lines(two_workers, "photoz_queue_depth{")} == \
        {str(p) for p in pids}
    log = two_workers.log()
    assert "with 2 worker processes" in log and "photoz.service[w0]" in log and "photoz.service[w1]" in log


def server_ends(server, pids):
    """{client port: worker pid} for every connection a worker holds on the server's port: the kernel's TCP table
    (/proc/net/tcp) gives each socket's inode, each worker's /proc/PID/fd its sockets (the listening one aside)."""
    inodes = {}
    for row in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = row.split()
        local, remote = (int(address.split(":")[1], 16) for address in fields[1:3])
        if local == server.port and remote != 0:
            inodes[fields[9]] = remote
    ends = {}
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            link = os.readlink(fd) if fd.is_symlink() else ""
            if link.startswith("socket:[") and link[8:-1] in inodes:
                ends[inodes[link[8:-1]]] = pid
    return ends


def open_healthz_connection(server):
    """A keep-alive connection that has had one answer (so a worker has accepted it)."""
    client = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    client.sendall(b"GET /healthz HTTP/1.1\r\nHost: photoz\r\n\r\n")
    assert client.recv(4096).startswith(b"HTTP/1.1 200")
    return client


def test_workers_share_the_connections_of_a_client_with_few(two_workers):
    """Each connection goes to the worker with the fewest open: a client's 8 keep-alive connections are 4 and 4,
    where the kernel alone handed a client's connections to whichever worker woke first."""
    pids = worker_pids(two_workers, 2)
    # the first workers start accepting together (a worker that accepted alone while the other was starting
    # would have taken every connection): no waiting for the second here
    clients = []

    def settle():  # until the workers hold exactly our open connections (the helpers' /metrics ones closed)
        ours = {c.getsockname()[1] for c in clients if c.fileno() >= 0}
        wait_for(lambda: set(server_ends(two_workers, pids)) == ours, timeout_s=10,
                 what="the workers holding only this test's connections")

    try:
        settle()
        for _ in range(8):  # one after another, each answered before the next opens: its worker has accepted it
            clients.append(open_healthz_connection(two_workers))
        ends = server_ends(two_workers, pids)
        owners = [ends[client.getsockname()[1]] for client in clients]
        assert sorted(owners.count(pid) for pid in pids) == [4, 4], owners

        def gauges():  # each worker's photoz_open_connections (updated once a second; /metrics' own adds one)
            lines = metric_lines(two_workers, "photoz_open_connections{")
            return {int(line.split('pid="')[1].split('"')[0]): float(line.split()[-1]) for line in lines}
        wait_for(lambda: set(gauges()) == set(pids) and all(4 <= v <= 5 for v in gauges().values()),
                 timeout_s=10, what="photoz_open_connections at 4 per worker")
        for client in clients[:4]:  # closed connections leave their worker's count: the next ones go there
            client.close()
        settle()
        kept = {pid: owners[4:].count(pid) for pid in pids}
        for _ in range(2):
            clients.append(open_healthz_connection(two_workers))
        ends = server_ends(two_workers, pids)
        new_owners = [ends[client.getsockname()[1]] for client in clients[8:]]
        expected = dict(kept)
        for _ in range(2):  # each to the worker with the fewest (ties either way: the sorted counts are the same)
            expected[min(expected, key=expected.__getitem__)] += 1
        after = {pid: kept[pid] + new_owners.count(pid) for pid in pids}
        assert sorted(after.values()) == sorted(expected.values()), (owners, new_owners)
    finally:
        for client in clients:
            client.close()


def test_auth_and_limits_hold_in_every_worker(two_workers, rng):
    body = npy_bytes(sky_cutouts(rng, 1))
    for _ in range(6):
        assert post(two_workers.url, sky_cutouts(rng, 1)).status_code == 401
        wrong = httpx.post(two_workers.url + "/v1/predict", content=body, timeout=30,
                           headers={"Authorization": "Bearer nope", "Content-Type": "application/x-npy"})
        assert wrong.status_code == 401
        big = httpx.post(two_workers.url + "/v1/predict", content=b"\x93NUMPY" + bytes(2 * 2**20), timeout=30,
                         headers={"Authorization": "Bearer sekret", "Content-Type": "application/x-npy"})
        assert big.status_code == 413 and "1 MiB" in big.json()["expected"]


def test_a_killed_worker_is_replaced_while_the_other_serves(tiny_bundle, tmp_path, rng):
    server = LiveServer(tiny_bundle, tmp_path / "kill.log", workers=2, max_batch_size=8, max_queue_wait_ms=10_000)
    try:
        victim, survivor = worker_pids(server, 2)
        results, stop = [], threading.Event()

        def client():
            body = npy_bytes(sky_cutouts(np.random.default_rng(0), 1))
            while not stop.is_set():
                try:
                    results.append(httpx.post(server.url + "/v1/predict", content=body, timeout=30,
                                              headers={"Content-Type": "application/x-npy"}).status_code)
                except httpx.HTTPError as exc:
                    results.append(type(exc).__name__)

        thread = threading.Thread(target=client)
        thread.start()
        wait_for(lambda: len(results) >= 10, what="requests before the kill")
        os.kill(victim, signal.SIGKILL)
        at_kill = len(results)
        replacement = wait_for(lambda: [p for p in worker_pids(server, 2) if p != victim and p != survivor],
                               what="a replacement worker")
        wait_for(lambda: len(results) >= at_kill + 20, what="requests after the kill")
        stop.set()
        thread.join(30)
        failures = [r for r in results if r != 200]
        assert len(failures) <= 1, failures  # at most the one request the killed worker held (one client thread)
        assert survivor in children(server.proc.pid) and replacement
        assert f"(pid {victim}) exited with -9" in server.log() and "replacing it" in server.log()
        assert not any(f'pid="{victim}"' in line for line in metric_lines(server, "photoz_queue_depth{"))
    finally:
        assert server.stop() == 0


def test_sigterm_drains_every_worker_and_loses_nothing(tiny_bundle, tmp_path, rng):
    server = LiveServer(tiny_bundle, tmp_path / "drain.log", workers=2, max_batch_size=8, max_queue_wait_ms=30_000)
    worker_pids(server, 2)
    stacks = [sky_cutouts(rng, 300) for _ in range(6)]
    answers = [None] * len(stacks)

    def send(i):
        answers[i] = post(server.url, stacks[i]).status_code

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(stacks))]
    for t in threads:
        t.start()
    # SIGTERM once every request is in (its cutouts incoming, queued, in a batch or answered: a request the
    # draining server never admitted is rightly a 503) and work is still queued or being decoded. In a batch at
    # any moment: at most two workers' two concurrent batches of 8, which the metrics do not count.
    def total(lines):
        return sum(float(line.split()[-1]) for line in lines)

    def all_in_and_busy():
        held = total(metric_lines(server, "photoz_queue_depth{") + metric_lines(server, "photoz_incoming_cutouts{"))
        answered = total(metric_lines(server, "photoz_objects_total "))
        return held > 0 and held + answered >= sum(len(s) for s in stacks) - 2 * 2 * 8

    wait_for(all_in_and_busy, what="every request in, work queued", poll_s=0.01)
    code = server.stop(timeout=60)
    for t in threads:
        t.join(60)
    assert answers == [200] * len(stacks) and code == 0
    assert server.log().count("drained and stopped") == 2
