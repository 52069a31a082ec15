"""Priors at request time through the real parts: a live photoz serve (/v1 and /v2), its FITS answer, the Python
client, and photoz predict over files, all against photoz.model.priors computed here on the same PDFs."""
import io
import json

import httpx
import numpy as np
import pytest
from astropy.io import fits

from photoz.model.bundle import load_bundle
from photoz.model.pdf import point_estimates
from photoz.model.priors import MIN_OBJECTS_SELF, ZERO_OVERLAP, for_population, resolve, reweight, training_nz
from photoz.pipeline.jobs import PredictJob
from tests.helpers import npy_bytes, sky_cutouts

NPY = {"Content-Type": "application/x-npy"}


@pytest.fixture(scope="module")
def prior_bundle(tiny_bundle, tmp_path_factory):
    """The tiny bundle with a training n(z) recorded (a gamma distribution peaking near z 0.1)."""
    import h5py

    from photoz.cli import main

    folder = tmp_path_factory.mktemp("prior")
    with h5py.File(folder / "train.h5", "w") as h5:
        h5["z"] = np.random.default_rng(7).gamma(3.0, 0.04, 5000)
    assert main(["record-prior", "--model", str(tiny_bundle), "--data", str(folder / "train.h5"),
                 "--out", str(folder / "prior.onnx")]) == 0
    return folder / "prior.onnx"


@pytest.fixture(scope="module")
def prior_server(prior_bundle, tmp_path_factory):
    from photoz.service.live import LiveServer

    srv = LiveServer(prior_bundle, tmp_path_factory.mktemp("logs") / "server.log", max_batch_size=32,
                     max_queue_wait_ms=30_000)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def cutouts():
    return sky_cutouts(np.random.default_rng(11), MIN_OBJECTS_SELF + 40)


def _post(url, images, **params):
    return httpx.post(url + "/v1/predict", content=npy_bytes(images), headers=NPY, params=params, timeout=120)


def _expected(bundle_path, pdfs, name, **kwargs):
    md = load_bundle(bundle_path).metadata
    train = training_nz(md.document, md.bins)
    prior = resolve(name, md.bins, train, kwargs.get("edges"), kwargs.get("weights"),
                    kwargs.get("selection_edges"), kwargs.get("selection_completeness"))
    prior = for_population(prior, pdfs, train)
    return reweight(pdfs, prior, train), md.bins


def test_a_request_names_its_prior_and_flat_is_bayes_rule(prior_server, prior_bundle, cutouts):
    images = cutouts[:5]
    plain = _post(prior_server.url, images).json()
    assert plain["prior"] == {"name": "train", "recorded": True}
    flat = _post(prior_server.url, images, prior="flat").json()
    assert flat["prior"]["name"] == "flat" and np.allclose(flat["prior"]["n_z"], 1 / len(flat["prior"]["n_z"]))
    (want, ok), bins = _expected(prior_bundle, np.asarray(plain["data"]["pdfs"], np.float32), "flat")
    assert ok.all()
    np.testing.assert_allclose(flat["data"]["pdfs"], want, atol=2e-6)
    np.testing.assert_allclose(flat["ancil"]["z_mean"], point_estimates(want, bins)["z_mean"], atol=2e-6)
    assert not np.allclose(flat["ancil"]["z_mean"], plain["ancil"]["z_mean"], atol=1e-4)  # it did something


def test_a_custom_histogram_rejects_the_objects_it_excludes(prior_server, prior_bundle, cutouts):
    images = cutouts[:8]
    plain = _post(prior_server.url, images).json()
    edges, weights = [0.0, 0.1, 0.2], [1.0, 3.0]
    got = _post(prior_server.url, images, prior_edges="0,0.1,0.2", prior_weights="1,3").json()
    assert got["prior"]["name"] == "custom" and got["prior"]["edges"] == edges
    (want, ok), _ = _expected(prior_bundle, np.asarray(plain["data"]["pdfs"], np.float32), "custom", edges=edges,
                              weights=weights)
    ids = [str(i) for i in range(8)]
    kept = [i for i, good in zip(ids, ok, strict=True) if good]
    assert got["ancil"]["ids"] == kept
    np.testing.assert_allclose(got["data"]["pdfs"], want[ok], atol=2e-6)
    assert all(r["error"] == ZERO_OVERLAP for r in got["rejected"]) and len(got["rejected"]) == (~ok).sum()
    assert np.max(got["ancil"]["z_hi95"]) <= 0.2 + 1e-9


def test_prior_self_estimates_the_requests_own_population(prior_server, prior_bundle, cutouts):
    few = _post(prior_server.url, cutouts[:3], prior="self")
    assert few.status_code == 422
    assert few.json()["field"] == "prior" and f"at least {MIN_OBJECTS_SELF}" in few.json()["detail"]
    plain = _post(prior_server.url, cutouts).json()
    got = _post(prior_server.url, cutouts, prior="self").json()
    assert got["prior"]["name"] == "self" and got["prior"]["n_objects"] == len(cutouts)
    (want, _), _ = _expected(prior_bundle, np.asarray(plain["data"]["pdfs"], np.float32), "self")
    np.testing.assert_allclose(got["data"]["pdfs"], want, atol=2e-6)
    np.testing.assert_allclose(np.sum(got["prior"]["n_z"]), 1.0, atol=1e-6)


@pytest.mark.parametrize("params, field", [({"prior": "uniform"}, "prior"),
                                           ({"prior_edges": "0,0.2"}, "prior_weights"),
                                           ({"prior_edges": "0.3,0.2", "prior_weights": "1"}, "prior_edges")])
def test_a_bad_prior_is_a_422_naming_its_field(prior_server, cutouts, params, field):
    response = _post(prior_server.url, cutouts[:2], **params)
    assert response.status_code == 422 and response.json()["field"] == field


def test_a_bundle_without_its_training_nz_refuses_other_priors(server, cutouts):
    response = _post(server.url, cutouts[:2], prior="flat")
    assert response.status_code == 422 and "does not record its training set's n(z)" in response.json()["detail"]
    assert _post(server.url, cutouts[:2]).json()["prior"] == {"name": "train", "recorded": False}


def test_fits_answers_and_the_open_inference_protocol_carry_the_prior(prior_server, prior_bundle, cutouts):
    images = cutouts[:4]
    flat = _post(prior_server.url, images, prior="flat").json()
    answer = httpx.post(prior_server.url + "/v1/predict", content=npy_bytes(images), timeout=60,
                        headers={**NPY, "Accept": "application/fits"}, params={"prior": "flat"})
    with fits.open(io.BytesIO(answer.content)) as hdul:
        assert hdul[0].header["PRIOR"] == "flat"
        np.testing.assert_allclose(hdul["PHOTOZ"].data["PDF"], flat["data"]["pdfs"], atol=2e-6)
        assert len(hdul["PRIOR"].data["N_Z"]) == load_bundle(prior_bundle).metadata.bins.n_bins
    name = load_bundle(prior_bundle).metadata.name
    doc = {"inputs": [{"name": "images", "datatype": "FP32", "shape": list(images.shape),
                       "data": images.ravel().tolist()}], "parameters": {"prior": "flat"}}
    v2 = httpx.post(f"{prior_server.url}/v2/models/{name}/infer", json=doc, timeout=60).json()
    assert v2["parameters"]["prior"] == "flat"
    probs = next(o for o in v2["outputs"] if o["name"] == "probabilities")
    np.testing.assert_allclose(np.reshape(probs["data"], probs["shape"]), flat["data"]["pdfs"], atol=2e-6)


def test_the_client_estimates_self_over_every_chunk_together(prior_server, cutouts):
    from photoz.service.client import PhotozClient

    client = PhotozClient(prior_server.url, chunk_size=64)  # four requests, the last of 48 objects
    plain = client.predict(cutouts)
    together = client.predict(cutouts, prior="self")
    assert together.prior["n_objects"] == len(cutouts) and plain.prior["name"] == "train"
    served = _post(prior_server.url, cutouts, prior="self").json()  # one request with all of them
    np.testing.assert_allclose(together.pdfs, served["data"]["pdfs"], atol=2e-6)
    flat = client.predict(cutouts[:10], prior="flat")
    np.testing.assert_allclose(flat.pdfs, _post(prior_server.url, cutouts[:10], prior="flat").json()["data"]["pdfs"],
                               atol=2e-6)


def test_photoz_predict_applies_the_prior_when_writing_the_table(prior_bundle, cutouts, prior_server, tmp_path):
    from photoz.pipeline.predict import predict_files

    np.save(tmp_path / "a.npy", cutouts[:120])
    np.save(tmp_path / "b.npy", cutouts[120:])
    tables = {}
    for prior in ("train", "flat", "self"):
        out = tmp_path / f"{prior}.fits"
        predict_files(PredictJob([tmp_path / "a.npy", tmp_path / "b.npy"], out, model=prior_bundle, chunk_size=50,
                                 quiet=True, prior=prior))
        with fits.open(out) as hdul:
            assert hdul[0].header["PRIOR"] == prior
            tables[prior] = np.array(hdul["PHOTOZ"].data["PDF"])
    (want, _), _ = _expected(prior_bundle, tables["train"], "flat")
    np.testing.assert_allclose(tables["flat"], want, atol=1e-6)
    (want, _), _ = _expected(prior_bundle, tables["train"], "self")  # the whole run's n(z), over five chunks
    np.testing.assert_allclose(tables["self"], want, atol=1e-6)
    served = _post(prior_server.url, cutouts, prior="self").json()
    np.testing.assert_allclose(tables["self"], served["data"]["pdfs"], atol=2e-6)


SELECTION = {"selection_edges": [0.0, 0.1, 0.2, 0.3], "selection_completeness": [1.0, 0.5, 0.1]}


def _commas(values):
    return ",".join(str(v) for v in values)


def test_a_declared_selection_reaches_every_route(prior_server, prior_bundle, cutouts, tmp_path):
    """selection_edges and selection_completeness: /v1 query, /v2 parameters, the client and photoz predict each
    give the PDFs photoz.model.priors computes here, and name the selection in the answer."""
    from photoz.cli import main
    from photoz.service.client import PhotozClient

    query = {k: _commas(v) for k, v in SELECTION.items()}
    plain = np.asarray(_post(prior_server.url, cutouts).json()["data"]["pdfs"], np.float32)
    got = _post(prior_server.url, cutouts, prior="self", **query).json()
    (want, ok), bins = _expected(prior_bundle, plain, "self", **SELECTION)
    assert got["prior"]["selection"] == {"edges": SELECTION["selection_edges"],
                                         "completeness": SELECTION["selection_completeness"]}
    assert len(got["ancil"]["ids"]) == ok.sum() and len(got["rejected"]) == (~ok).sum()
    np.testing.assert_allclose(got["data"]["pdfs"], want[ok], atol=2e-6)
    n_z, sample = np.asarray(got["prior"]["n_z"]), np.asarray(got["prior"]["sample_n_z"])
    assert (n_z[bins.centres > 0.3] == 0).all() and not np.allclose(n_z, sample)  # parent and selected differ
    unselected = np.asarray(_post(prior_server.url, cutouts, prior="self").json()["data"]["pdfs"])
    assert np.abs(unselected[ok] - want[ok]).max() > 1e-3  # the selection changed the answer
    # a custom n(z) of the selected sample, divided by the completeness
    custom = {"prior_edges": "0,0.4", "prior_weights": "1"}
    answer = _post(prior_server.url, cutouts[:6], **custom, **query).json()
    (want, ok), _ = _expected(prior_bundle, plain[:6], "custom", edges=[0.0, 0.4], weights=[1.0], **SELECTION)
    np.testing.assert_allclose(answer["data"]["pdfs"], want[ok], atol=2e-6)
    # /v2
    name = load_bundle(prior_bundle).metadata.name
    doc = {"inputs": [{"name": "images", "datatype": "FP32", "shape": list(cutouts[:6].shape),
                       "data": cutouts[:6].ravel().tolist()}],
           "parameters": {"prior_edges": [0.0, 0.4], "prior_weights": [1.0], **SELECTION}}
    v2 = httpx.post(f"{prior_server.url}/v2/models/{name}/infer", json=doc, timeout=60).json()
    probs = next(o for o in v2["outputs"] if o["name"] == "probabilities")
    np.testing.assert_allclose(np.reshape(probs["data"], probs["shape"]), answer["data"]["pdfs"], atol=2e-6)
    # the client: self over every chunk together, as one request gives it
    client = PhotozClient(prior_server.url, chunk_size=64)
    together = client.predict(cutouts, prior="self", **SELECTION)
    assert together.prior["selection"] == got["prior"]["selection"] and len(together) == len(got["ancil"]["ids"])
    np.testing.assert_allclose(together.pdfs, got["data"]["pdfs"], atol=2e-6)
    # photoz predict, its flags generated from the job
    np.save(tmp_path / "all.npy", cutouts)
    out = tmp_path / "selected.fits"
    assert main(["predict", str(tmp_path / "all.npy"), "--out", str(out), "--model", str(prior_bundle), "--quiet",
                 "--prior", "self", "--selection-edges", query["selection_edges"],
                 "--selection-completeness", query["selection_completeness"]]) == 0
    with fits.open(out) as hdul:
        assert hdul[0].header["PRIOR"] == "self"
        np.testing.assert_allclose(hdul["PHOTOZ"].data["PDF"][hdul["PHOTOZ"].data["VALID"]], got["data"]["pdfs"],
                                   atol=1e-6)
    # or the file photoz completeness writes; not both
    (tmp_path / "selection.json").write_text(json.dumps({**SELECTION, "cuts": ["r < 17"]}))
    from_file = tmp_path / "from_file.fits"
    args = ["predict", str(tmp_path / "all.npy"), "--model", str(prior_bundle), "--quiet", "--prior", "self",
            "--selection", str(tmp_path / "selection.json")]
    assert main([*args, "--out", str(from_file)]) == 0
    with fits.open(out) as a, fits.open(from_file) as b:
        np.testing.assert_array_equal(a["PHOTOZ"].data["PDF"], b["PHOTOZ"].data["PDF"])
    assert main([*args, "--out", str(tmp_path / "both.fits"), "--selection-edges", "0,0.4",
                 "--selection-completeness", "1"]) == 2


@pytest.mark.parametrize("params, field", [
    ({"prior": "flat", "selection_edges": "0,0.4", "selection_completeness": "1"}, "selection_edges"),
    ({"prior": "self", "selection_edges": "0,0.4"}, "selection_completeness"),
    ({"prior": "self", "selection_edges": "0,0.4", "selection_completeness": "2"}, "selection_completeness"),
    ({"prior": "self", "selection_edges": "0,x", "selection_completeness": "1"}, "selection_edges"),
])
def test_a_bad_selection_is_a_422_naming_its_field(prior_server, cutouts, params, field):
    response = _post(prior_server.url, cutouts[:2], **params)
    assert response.status_code == 422 and response.json()["field"] == field, response.text
