"""Running a bundle with ONNX Runtime: the one inference engine (no torch).

The service, ``photoz predict`` and ``photoz evaluate`` all run bundles
through :class:`OnnxPredictor`, so offline and served results are the same
numbers.
"""
from __future__ import annotations

import logging
from typing import Any

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


#: Shared libraries of TensorRT that ONNX Runtime's TensorRT provider loads (10.x, then 8.x).
TENSORRT_LIBRARIES = ("libnvinfer.so.10", "libnvinfer.so.8")


def tensorrt_loadable() -> bool:
    """Whether TensorRT's runtime library loads here (onnxruntime-gpu lists the provider either way)."""
    import ctypes

    for name in TENSORRT_LIBRARIES:
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


def choose_providers(setting: str = "auto", available: list[str] | None = None,
                     tensorrt_present: bool | None = None) -> list[str]:
    """Execution providers for a setting, restricted to what this onnxruntime build has.

    ``auto`` takes TensorRT only where its libraries load: otherwise ONNX
    Runtime would print an error for it and fall back at every start.
    """
    import onnxruntime as ort

    if setting not in PROVIDER_CHOICES:
        raise ValueError(f"provider must be one of {', '.join(PROVIDER_CHOICES)}, got {setting!r}")
    available = ort.get_available_providers() if available is None else available
    chosen = [p for p in PROVIDER_CHOICES[setting] if p in available]
    loadable = tensorrt_present
    if setting == "auto" and "TensorrtExecutionProvider" in chosen and \
            not (tensorrt_loadable() if loadable is None else loadable):
        log.info("TensorRT provider offered but its libraries (%s) do not load: not using it",
                 " or ".join(TENSORRT_LIBRARIES))
        chosen.remove("TensorrtExecutionProvider")
    return chosen or ["CPUExecutionProvider"]


def bucket_sizes(max_batch_size: int) -> tuple[int, ...]:
    """The batch shapes a bucketed engine runs: powers of two below ``max_batch_size``, and it."""
    return tuple(sorted({min(2**k, max_batch_size) for k in range(max_batch_size.bit_length() + 1)}))


class OnnxPredictor:
    """A bundle loaded into an ONNX Runtime session.

    ``predict(images, ebv)`` takes float32 ``(N, bands, S, S)`` nanomaggies
    and ``(N,)`` E(B-V), returns ``(N, n_bins)`` probabilities.
    """

    def __init__(self, bundle: Bundle, providers: str = "auto", intra_op_threads: int = 0,
                 inter_op_threads: int = 0, allow_spinning: bool = True) -> None:
        import onnxruntime as ort

        from photoz.model.quality import QualityFlagger

        self.bundle = bundle
        self.metadata = bundle.metadata
        self.flagger = QualityFlagger(bundle.metadata.bands, bundle.metadata.pixel_scale_arcsec,
                                      bundle.metadata.quality)
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
        self._session_args = (str(bundle.path), options, requested)
        self.session = self._new_session()
        self.providers = self.session.get_providers()
        self.buckets: tuple[int, ...] | None = None
        self._bucket_sessions: dict[int, Any] = {}
        if requested[0] != self.providers[0]:
            log.warning("requested %s but ONNX Runtime runs %s", requested[0], self.providers[0])

    @property
    def provider(self) -> str:
        """The execution provider that actually runs the graph."""
        return self.providers[0]

    def use_buckets(self, sizes: tuple[int, ...]) -> None:
        """Run only these batch shapes from now on, one session each.

        ONNX Runtime's CUDA provider re-tunes cuDNN whenever a session's input
        shape differs from its previous call (0.06-1 s a time): each batch is
        padded with zero cutouts to the smallest bucket that holds it and runs
        on that bucket's own session, whose shape therefore never changes; the
        padding rows are dropped from the output.
        """
        self.buckets = tuple(sorted(sizes))
        self._bucket_sessions = {self.buckets[-1]: self.session}

    def _new_session(self) -> Any:
        import onnxruntime as ort

        path, options, providers = self._session_args
        return ort.InferenceSession(path, options, providers=providers)

    def _session_for(self, size: int) -> Any:
        if size not in self._bucket_sessions:
            self._bucket_sessions[size] = self._new_session()
        return self._bucket_sessions[size]

    def predict(self, images: np.ndarray, ebv: np.ndarray) -> np.ndarray:
        return self._run(images, ebv, [self.metadata.output_probabilities])[0]

    def _run(self, images: np.ndarray, ebv: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
        """The graph's ``outputs`` for these cutouts (padded to a bucket's size when buckets are on)."""
        md = self.metadata
        images = np.ascontiguousarray(images, dtype=np.float32)
        ebv = np.ascontiguousarray(np.asarray(ebv, dtype=np.float32).reshape(-1, 1))
        n, session = len(images), self.session
        if self.buckets is not None:
            top = self.buckets[-1]
            if n > top:
                parts = [self._run(images[i:i + top], ebv[i:i + top], outputs) for i in range(0, n, top)]
                return [np.concatenate([p[k] for p in parts]) for k in range(len(outputs))]
            size = next(b for b in self.buckets if b >= n)
            if size > n:
                images = np.concatenate([images, np.zeros((size - n, *images.shape[1:]), np.float32)])
                ebv = np.concatenate([ebv, np.zeros((size - n, 1), np.float32)])
            session = self._session_for(size)
        return [out[:n] for out in session.run(outputs, {md.input_images: images, md.input_ebv: ebv})]

    def predict_with_estimates(self, images: np.ndarray, ebv: np.ndarray,
                               image_flags: bool = True) -> dict[str, np.ndarray]:
        """Probabilities, point estimates (with the members' spread ``z_epistemic_std`` where the bundle's graph
        gives it, else NaN) and ``flag_bits`` (:mod:`photoz.model.quality`), all row-aligned.

        With ``image_flags=False``, ``flag_bits`` holds only the PDF's own flag: the caller measures the cutouts'
        flags itself (:meth:`image_flag_bits`), as the server does beside the inference: on a GPU they cost
        far more CPU time per cutout than the network's GPU time.
        """
        from photoz.model.pdf import point_estimates
        from photoz.model.quality import pdf_flag_bits

        md = self.metadata
        if md.output_epistemic is None:
            probs, spread = self.predict(images, ebv), None
        else:  # an ensemble or MC dropout: the members' spread comes with the PDF
            probs, spread = self._run(images, ebv, [md.output_probabilities, md.output_epistemic])
        bits = self.flagger.flag_bits(images, ebv, probs) if image_flags else pdf_flag_bits(probs)
        return {"probs": probs, **point_estimates(probs, md.bins, spread), "flag_bits": bits}

    def image_flag_bits(self, images: np.ndarray, ebv: np.ndarray) -> np.ndarray:
        """The flags measured on the cutouts (all but the PDF's): (N,) uint32."""
        return self.flagger.image_bits(images, ebv)

    def predict_batched(self, images: np.ndarray, ebv: np.ndarray, batch_size: int = 64) -> np.ndarray:
        out = [self.predict(images[i:i + batch_size], ebv[i:i + batch_size])
               for i in range(0, len(images), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.metadata.bins.n_bins), np.float32)
