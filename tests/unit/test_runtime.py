"""The ONNX Runtime engine: fixed-shape buckets (for GPUs) and honest provider choice."""
import numpy as np
import pytest

from photoz.model.bundle import load_bundle
from photoz.model.runtime import OnnxPredictor, bucket_sizes, choose_providers
from tests.helpers import sky_cutouts

ALL_GPU = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def test_bucket_sizes_are_powers_of_two_and_the_maximum():
    assert bucket_sizes(8) == (1, 2, 4, 8)
    assert bucket_sizes(100) == (1, 2, 4, 8, 16, 32, 64, 100)
    assert bucket_sizes(1) == (1,)


class RecordingSession:
    """A real session that records the batch size of every call."""

    def __init__(self, session, log):
        self.session, self.log = session, log

    def run(self, outputs, feeds):
        self.log.append((id(self), next(iter(feeds.values())).shape[0]))
        return self.session.run(outputs, feeds)


def test_batches_of_any_size_reach_the_engine_only_in_bucket_shapes_one_session_each(tiny_bundle, tiny_predictor,
                                                                                     rng):
    predictor = OnnxPredictor(load_bundle(tiny_bundle), providers="cpu")
    calls = []
    make = predictor._new_session
    predictor._new_session = lambda: RecordingSession(make(), calls)
    predictor.session = predictor._new_session()
    predictor.use_buckets(bucket_sizes(8))
    for n in (3, 5, 1, 8, 13, 2, 7):
        images = sky_cutouts(rng, n)
        ebv = rng.uniform(0, 0.1, n).astype(np.float32)
        out = predictor.predict(images, ebv)
        assert out.shape == (n, 180)  # padding rows dropped
        np.testing.assert_allclose(out, tiny_predictor.predict(images, ebv), atol=1e-6)
    sizes = [size for _, size in calls]
    assert set(sizes) <= {1, 2, 4, 8} and sizes == [4, 8, 1, 8, 8, 8, 2, 8]  # 13 = 8 + 8 (5 padded)
    shapes_per_session = {}
    for session, size in calls:
        shapes_per_session.setdefault(session, set()).add(size)
    assert all(len(shapes) == 1 for shapes in shapes_per_session.values())  # no session ever changes shape


def test_auto_takes_tensorrt_only_where_its_libraries_load():
    assert choose_providers("auto", ALL_GPU, tensorrt_present=False) == ALL_GPU[1:]
    assert choose_providers("auto", ALL_GPU, tensorrt_present=True) == ALL_GPU
    assert choose_providers("tensorrt", ALL_GPU, tensorrt_present=False) == ALL_GPU  # asked for: tried
    assert choose_providers("auto", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    with pytest.raises(ValueError, match="one of"):
        choose_providers("gpu")


@pytest.mark.parametrize("setting, bucketed", [("on", True), ("off", False), ("auto", False)])
def test_the_service_buckets_on_gpus_or_when_asked(tiny_bundle, setting, bucketed):
    from photoz.service.engine import ServingEngine
    from photoz.service.settings import Settings

    engine = ServingEngine(Settings(model=tiny_bundle, providers="cpu", shape_buckets=setting, max_batch_size=16,
                                    warmup=False))
    assert engine.predictor.buckets == ((1, 2, 4, 8, 16) if bucketed else None)
