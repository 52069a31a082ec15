"""Python client of the photoz service.

    from photoz.service.client import PhotozClient
    client = PhotozClient("http://127.0.0.1:8000", api_key=None)
    results = client.predict(images)             # (N, 5, 64, 64) nanomaggies, or channel-last
    results = client.predict(["a.fits", "b.npz"])  # or files
    table = results.to_table()                    # astropy Table, one row per object
    ensemble = results.to_qp()                    # qp.Ensemble of the PDFs (needs qp)

Large arrays are sent in chunks, several at a time; 429 and 503 answers
(overload, draining) are retried after the server's ``Retry-After``.
"""
from __future__ import annotations

import functools
import io
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from photoz.formats.inputs import KIND_MEDIA_TYPES, kind_for_suffix

RETRY_STATUSES = (429, 503)


class PhotozError(RuntimeError):
    """The service refused a request; ``problem`` is its JSON problem body."""

    def __init__(self, status: int, problem: dict[str, Any] | str) -> None:
        detail = problem.get("detail", problem) if isinstance(problem, dict) else problem
        super().__init__(f"HTTP {status}: {detail}")
        self.status, self.problem = status, problem


@dataclass
class PhotozResults:
    """Predictions for many objects: ``ids``, point estimates, PDFs on ``bins`` (edges)."""

    bins: np.ndarray
    ids: list[str] = field(default_factory=list)
    estimates: dict[str, np.ndarray] = field(default_factory=dict)
    pdfs: np.ndarray | None = None
    flags: list[list[str]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    model: dict[str, Any] = field(default_factory=dict)
    prior: dict[str, Any] = field(default_factory=lambda: {"name": "train"})  # the prior the PDFs are under

    @classmethod
    def from_json(cls, doc: dict[str, Any], id_prefix: str = "") -> PhotozResults:
        ancil = doc["ancil"]
        estimates = {k: np.asarray(v, dtype=np.float64) for k, v in ancil.items() if k.startswith("z_")}
        pdfs = np.asarray(doc["data"]["pdfs"], dtype=np.float64) if "data" in doc else None
        rejected = [{**r, "id": id_prefix + r["id"]} for r in doc.get("rejected", [])]
        return cls(np.asarray(doc["meta"]["bins"]), [id_prefix + i for i in ancil["ids"]], estimates, pdfs,
                   ancil["flags"], rejected, doc["model"], doc.get("prior", {"name": "train"}))

    @classmethod
    def concatenate(cls, parts: list[PhotozResults]) -> PhotozResults:
        first = parts[0]
        pdfs = None if first.pdfs is None else np.concatenate([p.pdfs for p in parts])
        return cls(first.bins, [i for p in parts for i in p.ids],
                   {k: np.concatenate([p.estimates[k] for p in parts]) for k in first.estimates}, pdfs,
                   [f for p in parts for f in p.flags], [r for p in parts for r in p.rejected], first.model,
                   first.prior)

    def __len__(self) -> int:
        return len(self.ids)

    def to_table(self) -> Any:
        """astropy Table: one row per object with a PDF; ``meta`` holds the bins and the model."""
        from astropy.table import Table

        table = Table({"id": self.ids, **self.estimates, "flags": [",".join(f) for f in self.flags]})
        if self.pdfs is not None:
            table["pdf"] = self.pdfs
        table.meta.update({"z_bin_edges": self.bins.tolist(), "model": self.model, "rejected": self.rejected})
        return table

    def to_qp(self) -> Any:
        """qp.Ensemble of histogram PDFs, with ids and point estimates as ancillary data."""
        import qp

        if self.pdfs is None:
            raise ValueError("no PDFs in these results: ask for them with pdf=True")
        ensemble = qp.Ensemble(qp.hist, data={"bins": self.bins, "pdfs": self.pdfs})
        ensemble.set_ancil({"ids": np.asarray(self.ids), **self.estimates})
        return ensemble


class PhotozClient:
    """A client of a running photoz service.

    Parameters
    ----------
    url : str
        The service's base URL, e.g. ``http://127.0.0.1:8000``.
    api_key : str, optional
        Sent as ``Authorization: Bearer <key>``.
    timeout_s : float
        Per-request timeout, seconds.
    retries : int
        How often a 429/503 answer (after its ``Retry-After``) or a transport error is retried.
    max_concurrency : int
        Requests in flight at once when a large stack is sent in chunks.
    chunk_size : int
        Cutouts per request when sending an array.
    """

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 120.0, retries: int = 8,
                 max_concurrency: int = 4, chunk_size: int = 256) -> None:
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout_s, self.retries = timeout_s, retries
        self.max_concurrency, self.chunk_size = max_concurrency, chunk_size
        self._http = httpx.Client(timeout=timeout_s, headers=self.headers)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> PhotozClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def models(self) -> dict[str, Any]:
        """The served models' metadata (``GET /v1/models``)."""
        response = self._http.get(f"{self.url}/v1/models")
        self._raise_for(response)
        return response.json()

    def predict(self, inputs: Any, ebv: Any = None, ids: Any = None, pdf: bool = True, prior: str | None = None,
                prior_edges: Any = None, prior_weights: Any = None, selection_edges: Any = None,
                selection_completeness: Any = None) -> PhotozResults:
        """PDFs and point estimates of cutouts.

        Parameters
        ----------
        inputs : array_like or path or list of path
            Cutouts in nanomaggies, ``(N, bands, S, S)`` or ``(bands, S, S)`` (channel-last works too),
            or FITS / .npy / .npz files.
        ebv : float or array_like, optional
            Galactic E(B-V) in mag, one value or one per cutout (arrays only; files carry their own).
        ids : sequence of str, optional
            Object ids (arrays only; default: the index).
        pdf : bool
            Return the PDFs as well as the point estimates.
        prior, prior_edges, prior_weights : optional
            The redshift prior of the PDFs (docs/priors.md): ``train`` (default), ``flat``, a custom histogram
            (``prior_edges``, ``prior_weights``), applied by the service; or ``self``, the n(z) of all the
            objects given here (by EM over every chunk's PDFs together, here: needs ``pdf=True``).
        selection_edges, selection_completeness : optional
            With ``self`` or a custom prior, the objects' selection from their parent population: its
            completeness per redshift bin (``photoz.model.priors.completeness_histogram``), so that a sample cut
            on its photometry is not counted twice (docs/priors.md).

        Returns
        -------
        PhotozResults
            ids, point estimates, PDFs on ``bins``, flags, and the objects the service rejected.
        """
        if prior == "self" and not pdf:
            raise ValueError("prior='self' needs the PDFs (pdf=True): their n(z) is estimated from them")
        query = {"pdf": "full" if pdf else "none"}
        if prior not in (None, "self"):
            query["prior"] = prior
        selection = {"selection_edges": selection_edges, "selection_completeness": selection_completeness}
        for key, values in (("prior_edges", prior_edges), ("prior_weights", prior_weights),
                            *(selection.items() if prior != "self" else ())):
            if values is not None:
                query[key] = ",".join(repr(float(v)) for v in np.ravel(values))
        if isinstance(inputs, (str, Path)):
            inputs = [inputs]
        if isinstance(inputs, (list, tuple)) and inputs and isinstance(inputs[0], (str, Path)):
            jobs = [self._file_job(Path(p), len(inputs) > 1, query) for p in inputs]
        else:
            jobs = self._array_jobs(np.asarray(inputs), ebv, ids, query)
        with ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
            parts = list(pool.map(lambda job: job(), jobs))
        results = PhotozResults.concatenate(parts)
        return self._population_prior(results, selection) if prior == "self" else results

    def _population_prior(self, results: PhotozResults, selection: dict[str, Any]) -> PhotozResults:
        """``prior='self'`` over every object at once (the service would estimate it per request)."""
        from photoz.model import priors
        from photoz.model.pdf import RedshiftBins
        from photoz.model.quality import bits_from_names, flag_names

        bins = RedshiftBins(results.bins)
        train = priors.training_nz(self.models()["models"][0]["metadata"], bins)
        try:
            chosen = priors.resolve("self", bins, train, **selection)
            assert results.pdfs is not None and train is not None  # pdf=True; resolve needs the n(z)
            chosen = priors.for_population(chosen, results.pdfs, train)
        except priors.PriorError as exc:
            raise ValueError(str(exc)) from None
        # what the service does per request (photoz.model.priors.apply), on the objects' bits; an object whose PDF
        # lies wholly where a declared selection keeps nothing is rejected, as the service would
        outputs, ok = priors.apply({"probs": results.pdfs, **results.estimates,
                                    "flag_bits": bits_from_names(results.flags)}, chosen, train, bins)
        pdfs, bits = outputs.pop("probs")[ok].astype(np.float64), outputs.pop("flag_bits")[ok]
        rejected = results.rejected + [{"id": results.ids[i], "error": priors.ZERO_OVERLAP}
                                       for i in np.flatnonzero(~ok)]
        return PhotozResults(results.bins, [i for i, keep in zip(results.ids, ok, strict=True) if keep],
                             {k: v[ok] for k, v in outputs.items()}, pdfs, flag_names(bits), rejected,
                             results.model, chosen.describe())

    def _array_jobs(self, images: np.ndarray, ebv: Any, ids: Any,
                    query: dict[str, str]) -> list[Callable[[], PhotozResults]]:
        if images.ndim == 3:
            images = images[None]
        n = images.shape[0]
        ebv = np.zeros(n, np.float32) if ebv is None else np.broadcast_to(np.asarray(ebv, np.float32), (n,))
        ids = np.array([str(i) for i in range(n)]) if ids is None else np.asarray(ids).astype(str)
        jobs: list[Callable[[], PhotozResults]] = []
        for start in range(0, n, self.chunk_size):
            sl = slice(start, start + self.chunk_size)
            buffer = io.BytesIO()
            np.savez(buffer, images=images[sl], ebv=ebv[sl], ids=ids[sl])
            jobs.append(functools.partial(self._post, buffer.getvalue(), "application/x-npz", query))
        return jobs

    def _file_job(self, path: Path, prefix: bool, query: dict[str, str]) -> Callable[[], PhotozResults]:
        content_type = KIND_MEDIA_TYPES.get(kind_for_suffix(path.name) or "", "application/octet-stream")
        return lambda: self._post(path.read_bytes(), content_type, query, f"{path.name}:" if prefix else "")

    def _post(self, body: bytes, content_type: str, params: dict[str, str], id_prefix: str = "") -> PhotozResults:
        for attempt in range(self.retries + 1):
            try:
                response = self._http.post(f"{self.url}/v1/predict", content=body, params=params,
                                           headers={"Content-Type": content_type, "Accept": "application/json"})
            except httpx.TransportError:
                if attempt == self.retries:
                    raise
                time.sleep(min(2**attempt * 0.2, 10))
                continue
            if response.status_code in RETRY_STATUSES and attempt < self.retries:
                time.sleep(float(response.headers.get("retry-after", 1)))
                continue
            self._raise_for(response)
            return PhotozResults.from_json(response.json(), id_prefix)
        raise AssertionError("unreachable")

    @staticmethod
    def _raise_for(response: httpx.Response) -> None:
        if response.status_code >= 400:
            try:
                problem = response.json()
            except ValueError:
                problem = response.text
            raise PhotozError(response.status_code, problem)
