import numpy as np
import pytest


@pytest.fixture(scope="session")
def tiny_net():
    import torch

    from photoz.model.network.pasquet import build

    torch.manual_seed(0)
    net = build("pasquet2019_tiny").eval()
    with torch.no_grad():  # sharpen the random output layer so distinct inputs get visibly distinct PDFs
        net.classifier[-1].weight.mul_(40)
    return net


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_net):
    """A random-weight tiny bundle, exported once per test session."""
    from photoz.model.network.export import export_bundle, make_metadata, untrained_record

    path = tmp_path_factory.mktemp("bundle") / "tiny.onnx"
    metadata = make_metadata(tiny_net, "pasquet2019_tiny", "photoz-test-tiny", "0.0.1", untrained_record())
    export_bundle(tiny_net, path, metadata)
    return path


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.fixture(scope="session")
def tiny_predictor(tiny_bundle):
    from photoz.model.bundle import load_bundle
    from photoz.model.runtime import OnnxPredictor

    return OnnxPredictor(load_bundle(tiny_bundle), providers="cpu")


@pytest.fixture(scope="session")
def server(tiny_bundle, tmp_path_factory):
    """The default server: tiny bundle, small batches so batching is exercised.

    Its latency target for admission is generous (10 s): tests that use it send
    bursts to check results and batching, and on a slow CI machine a burst of a
    few hundred cutouts can take longer than the default 150 ms to drain, which
    the server (rightly) answers with 429. Overload has its own servers and tests.
    """
    from photoz.service.live import LiveServer

    srv = LiveServer(tiny_bundle, tmp_path_factory.mktemp("logs") / "server.log",
                     max_batch_size=8, max_queue_delay_ms=20, max_queue_wait_ms=10_000)
    yield srv
    srv.stop()


def pytest_collection_modifyitems(items):
    """Each test carries the marker of its folder: unit, integration or e2e (``pytest -m unit``)."""
    for item in items:
        suite = item.path.parent.name
        if suite in ("unit", "integration", "e2e"):
            item.add_marker(getattr(pytest.mark, suite))
