"""Running a bundle with ONNX Runtime: the one inference engine (no torch).

The service, ``photoz predict`` and ``photoz evaluate`` all run bundles
through :class:`OnnxPredictor`, so offline and served results are the same
numbers.
"""
from __future__ import annotations

import logging

import numpy as np

from photoz.model.bundle import Bundle

log = logging.getLogger("photoz.runtime")

#: Provider choices by setting; ``auto`` takes the first one ORT has.
PROVIDER_CHOICES = {
    "auto": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
    "tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
    "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "cpu": ("CPUExecutionProvider",),
}


def choose_providers(setting: str = "auto", available: list[str] | None = None) -> list[str]:
    """Execution providers for a setting, restricted to what this onnxruntime build has."""
    import onnxruntime as ort

    if setting not in PROVIDER_CHOICES:
        raise ValueError(f"provider must be one of {', '.join(PROVIDER_CHOICES)}, got {setting!r}")
    available = ort.get_available_providers() if available is None else available
    chosen = [p for p in PROVIDER_CHOICES[setting] if p in available]
    return chosen or ["CPUExecutionProvider"]


class OnnxPredictor:
    """A bundle loaded into an ONNX Runtime session.

    ``predict(images, ebv)`` takes float32 ``(N, bands, S, S)`` nanomaggies
    and ``(N,)`` E(B-V), returns ``(N, n_bins)`` probabilities.
    """

    def __init__(self, bundle: Bundle, providers: str = "auto", intra_op_threads: int = 0,
                 inter_op_threads: int = 0, allow_spinning: bool = True):
        import onnxruntime as ort

        self.bundle = bundle
        self.metadata = bundle.metadata
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = inter_op_threads
        # spinning threads wait hot for the next call: good offline, but in a server
        # they steal the cores that HTTP parsing and encoding need between batches
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
        requested = choose_providers(providers)
        if requested[0] != "CPUExecutionProvider" and hasattr(ort, "preload_dlls"):
            # CUDA and cuDNN from pip wheels (onnxruntime-gpu[cuda,cudnn]) are found this way
            try:
                ort.preload_dlls()
            except Exception as exc:  # a missing library is reported by the session below
                log.warning("could not preload CUDA libraries: %s", exc)
        self.session = ort.InferenceSession(str(bundle.path), options, providers=requested)
        self.providers = self.session.get_providers()
        if requested[0] != self.providers[0]:
            log.warning("requested %s but ONNX Runtime runs %s", requested[0], self.providers[0])

    @property
    def provider(self) -> str:
        """The execution provider that actually runs the graph."""
        return self.providers[0]

    def predict(self, images: np.ndarray, ebv: np.ndarray) -> np.ndarray:
        md = self.metadata
        feeds = {
            md.input_images: np.ascontiguousarray(images, dtype=np.float32),
            md.input_ebv: np.ascontiguousarray(np.asarray(ebv, dtype=np.float32).reshape(-1, 1)),
        }
        return self.session.run([md.output_probabilities], feeds)[0]

    def predict_with_estimates(self, images: np.ndarray, ebv: np.ndarray) -> dict[str, np.ndarray]:
        """Probabilities plus point estimates, all row-aligned (estimates vectorised over the batch)."""
        from photoz.model.pdf import point_estimates

        probs = self.predict(images, ebv)
        return {"probs": probs, **point_estimates(probs, self.metadata.bins)}

    def predict_batched(self, images: np.ndarray, ebv: np.ndarray, batch_size: int = 64) -> np.ndarray:
        out = [self.predict(images[i:i + batch_size], ebv[i:i + batch_size])
               for i in range(0, len(images), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.metadata.bins.n_bins), np.float32)
