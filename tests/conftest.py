import numpy as np
import pytest


@pytest.fixture(scope="session")
def tiny_net():
    import torch

    from model.pasquet import build

    torch.manual_seed(0)
    return build("pasquet2019_tiny").eval()


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_net):
    """A random-weight tiny bundle, exported once per test session."""
    from model.export import export_bundle, make_metadata, untrained_record

    path = tmp_path_factory.mktemp("bundle") / "tiny.onnx"
    metadata = make_metadata(tiny_net, "pasquet2019_tiny", "photoz-test-tiny", "0.0.1", untrained_record())
    export_bundle(tiny_net, path, metadata)
    return path


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
