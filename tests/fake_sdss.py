"""A local fake of the SDSS archive for ``photoz sdss-dataset`` tests: SkyServer's SqlSearch and the Science
Archive Server's frames, over real HTTP on 127.0.0.1, built from a field simulated by ``photoz simulate-field``.

The simulated field (noise-free, so a cutout's r band can be checked exactly against the galaxy drawn alone)
is cut into two overlapping SDSS-like fields of one run and camcol (rows ``[0, B + 20)`` and ``[B - 60, H)``),
each band written as a ``frame-{band}-{run:06d}-{camcol}-{field:04d}.fits.bz2`` in nanomaggies, as SDSS
frames are. Each galaxy belongs to the field whose rows ``< B`` / ``>= B`` hold it; one is placed 10 rows
before ``B``, so its stamp runs off its own frame and must come from the neighbouring field. The simulator's
edge objects run off every frame. One extra catalogue row names a field the archive does not have.

Failures on demand: ``fail_next[path] = k`` answers the next k requests of ``path`` with 503;
``slow[substring] = s`` holds every request whose path contains ``substring`` for ``s`` seconds.
"""
from __future__ import annotations

import bz2
import csv
import io
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np

RUN, CAMCOL, FIELDS = 1000, 3, (11, 12)
MISSING_FIELD = 99
TOP = re.compile(r"SELECT TOP (\d+)")
AFTER = re.compile(r"s\.specObjID > (\d+)")
RA_DEC = re.compile(r"p\.ra BETWEEN (\S+) AND (\S+) AND p\.dec BETWEEN (\S+) AND (\S+)")


def build_archive(root: Path, n: int = 16, seed: int = 5) -> dict:
    """Frames under ``root/sas`` and the catalogue rows SkyServer serves; returns what the tests check against."""
    from astropy.io import fits

    from photoz.model.conventions import BANDS, EXTINCTION_A_OVER_EBV
    from photoz.pipeline.cutouts import read_band_image
    from photoz.training.simulation.field import render_field

    field_dir = root / "field"
    render_field(field_dir, n=n, seed=seed, n_edge=2, noise=False)
    truth = dict(np.load(field_dir / "truth.npz", allow_pickle=False))
    images = {b: read_band_image(field_dir / f"frame-{b}.fits", b) for b in BANDS}
    height = images["r"].data.shape[0]
    inner = np.flatnonzero(~truth["near_edge"])
    y = truth["y_r"]
    # the boundary: 10 rows below an inner galaxy in the middle of the field
    pick = inner[np.argsort(np.abs(y[inner] - height / 2))[0]]
    boundary = int(round(y[pick])) + 10
    rows_of = {FIELDS[0]: (0, boundary + 20), FIELDS[1]: (boundary - 60, height)}
    for field, (r0, r1) in rows_of.items():
        folder = root / "sas" / "301" / str(RUN) / str(CAMCOL)
        folder.mkdir(parents=True, exist_ok=True)
        for band, image in images.items():
            header = image.wcs[r0:r1, :].to_header()  # the WCS of the crop
            header["BUNIT"], header["FILTER"] = "nanomaggy", band
            buffer = io.BytesIO()
            fits.PrimaryHDU(image.data[r0:r1], header=header).writeto(buffer)
            (folder / f"frame-{band}-{RUN:06d}-{CAMCOL}-{field:04d}.fits.bz2").write_bytes(
                bz2.compress(buffer.getvalue()))
    from astropy.table import Table

    catalogue = Table.read(field_dir / "catalogue.csv", format="ascii.csv")
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(n):
        mags = 17.0 + rng.normal(0, 0.5, 5)
        row = {"specObjID": 10_000 + 37 * k, "objID": 5_000_000 + k, "ra": float(catalogue["ra"][k]),
               "dec": float(catalogue["dec"][k]), "z": float(truth["z"][k]), "run": RUN, "rerun": 301,
               "camcol": CAMCOL, "field": FIELDS[0] if y[k] < boundary else FIELDS[1]}
        for b, band in enumerate(BANDS):
            row[f"modelMag_{band}"] = round(float(mags[b]), 4)
            row[f"petroMag_{band}"] = round(float(mags[b] + 0.1), 4)
            row[f"extinction_{band}"] = round(float(truth["ebv"][k] * EXTINCTION_A_OVER_EBV[band]), 5)
        row["petroR50_r"] = 2.5
        rows.append(row)
    lost = dict(rows[int(inner[0])], specObjID=10_000 + 37 * n, objID=5_000_000 + n, field=MISSING_FIELD)
    rows.append(lost)
    return {"rows": rows, "truth": truth, "boundary": boundary, "neighbour_object": int(pick),
            "edge_objects": np.flatnonzero(truth["near_edge"]).tolist(), "missing_field_specobjid": lost["specObjID"]}


class FakeArchive:
    """The fake SkyServer (``url + "/skyserver"``) and SAS (``url + "/sas"``) in a thread; ``requests`` logs paths."""

    def __init__(self, root: Path, rows: list[dict]) -> None:
        self.root, self.rows = root, sorted(rows, key=lambda r: r["specObjID"])
        self.requests: list[str] = []
        self.fail_next: dict[str, int] = {}
        self.slow: dict[str, float] = {}  # path substring -> seconds each matching request is held
        archive = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                url = urlparse(self.path)
                archive.requests.append(url.path)
                for part, seconds in list(archive.slow.items()):
                    if part in url.path:
                        time.sleep(seconds)
                if archive.fail_next.get(url.path, 0) > 0:
                    archive.fail_next[url.path] -= 1
                    return self.answer(503, b"busy", "text/plain")
                if url.path == "/skyserver":
                    return self.answer(200, archive.query(parse_qs(url.query)["cmd"][0]).encode(), "text/plain")
                if url.path.startswith("/sas/"):
                    return self.frame(archive.root / url.path.lstrip("/"))
                return self.answer(404, b"not found", "text/plain")

            def frame(self, path: Path):
                if not path.is_file():
                    return self.answer(404, b"no such frame", "text/plain")
                data = path.read_bytes()
                ranged = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
                if ranged:
                    start = int(ranged.group(1))
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                    self.send_header("Content-Length", str(len(data) - start))
                    self.end_headers()
                    self.wfile.write(data[start:])
                    return None
                return self.answer(200, data, "application/x-bzip2")

            def answer(self, status: int, body: bytes, content_type: str):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def query(self, sql: str) -> str:
        """What SkyServer's CSV answer to one page of :func:`photoz.pipeline.sdss.selection_sql` would be."""
        from photoz.pipeline.sdss_archive import CATALOGUE_COLUMNS

        top, after = int(TOP.search(sql).group(1)), int(AFTER.search(sql).group(1))
        chosen = [r for r in self.rows if r["specObjID"] > after]
        box = RA_DEC.search(sql)
        if box:
            ra0, ra1, dec0, dec1 = map(float, box.groups())
            chosen = [r for r in chosen if ra0 <= r["ra"] <= ra1 and dec0 <= r["dec"] <= dec1]
        out = io.StringIO()
        out.write("#Table1\n")
        writer = csv.DictWriter(out, fieldnames=CATALOGUE_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in chosen[:top]:
            writer.writerow(row)
        return out.getvalue()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
