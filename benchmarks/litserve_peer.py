"""The reference peer of benchmarks/serve.py: the same bundle served by LitServe with its own batching.

    python -m benchmarks.litserve_peer --model bundle.onnx --port 8001

Requests are JSON {"npy": base64 of a .npy cutout}: LitServe decodes JSON bodies,
and base64 keeps the pixel payload binary (parsing cost ~ that of a raw .npy).
The response carries the PDF, the point estimates and the bins, like photoz's.
"""
from __future__ import annotations

import argparse
import base64
import io
import os

import litserve as ls
import numpy as np

from photoz.model.bundle import load_bundle  # noqa: E402
from photoz.model.pdf import point_estimates  # noqa: E402
from photoz.model.runtime import OnnxPredictor  # noqa: E402


class PhotozLitAPI(ls.LitAPI):
    def setup(self, device):
        self.predictor = OnnxPredictor(load_bundle(os.environ["PHOTOZ_BENCH_MODEL"]),
                                       providers=os.environ.get("PHOTOZ_BENCH_PROVIDERS", "cpu"),
                                       allow_spinning=False)  # the same engine settings as photoz's
        self.bins = self.predictor.metadata.bins

    def decode_request(self, request):
        return np.load(io.BytesIO(base64.b64decode(request["npy"])), allow_pickle=False).astype(np.float32)

    def batch(self, inputs):
        return np.stack(inputs)

    def predict(self, images):
        return self.predictor.predict(images, np.zeros(len(images), np.float32))

    def unbatch(self, output):
        return list(output)

    def encode_response(self, probs):
        est = point_estimates(probs[None], self.bins)
        return {"pdf": np.round(probs.astype(np.float64), 7).tolist(),
                # a single network's z_epistemic_std is NaN: null, as photoz answers it (JSON has no NaN)
                **{k: float(v[0]) if np.isfinite(v[0]) else None for k, v in est.items()},
                "bins": self.bins.edges.tolist()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-timeout-s", type=float, default=0.002)
    parser.add_argument("--providers", default="cpu", help="ONNX Runtime providers, as photoz serve's")
    args = parser.parse_args()
    os.environ["PHOTOZ_BENCH_MODEL"] = args.model
    os.environ["PHOTOZ_BENCH_PROVIDERS"] = args.providers  # read by the worker processes LitServe starts
    api = PhotozLitAPI(max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout_s)
    # LitServe's accelerator only places torch models; the ONNX Runtime session picks its device itself
    ls.LitServer(api, accelerator="cpu", workers_per_device=1).run(port=args.port, generate_client_file=False)


if __name__ == "__main__":
    main()
