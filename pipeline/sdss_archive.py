"""The SDSS archive as ``photoz sdss-dataset`` uses it: the SkyServer SQL selection of the Main Galaxy Sample
(keyset-paged, pages kept for resuming) and the Science Archive Server's calibrated frames (a checked,
resumable cache). Every request retries 5xx, 429 and network errors with exponential backoff.
"""
from __future__ import annotations

import bz2
import csv
import io
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from photoz.model.conventions import BANDS, DEFAULT_Z_MAX

DATA_RELEASE = "DR17"
SKYSERVER_URL = "https://skyserver.sdss.org/dr17/SkyServerWS/SearchTools/SqlSearch"
SAS_URL = "https://data.sdss.org/sas/dr17/eboss/photoObj/frames"
#: The photometric reprocessing the DR8-DR17 frames belong to.
RERUN = 301
#: ``legacy_target1`` bit of the Main Galaxy Sample (TARGET_GALAXY).
MGS_TARGET_BIT = 0x40
#: The MGS limit on dereddened Petrosian r, mag (Strauss et al. 2002).
MGS_PETRO_R_LIMIT_MAG = 17.77
CATALOGUE_COLUMNS = ("specObjID", "objID", "ra", "dec", "z", "run", "rerun", "camcol", "field",
                     *(f"modelMag_{b}" for b in BANDS), *(f"petroMag_{b}" for b in BANDS),
                     *(f"extinction_{b}" for b in BANDS), "petroR50_r")
RETRY_STATUSES = {429, 500, 502, 503, 504}


class SDSSArchiveError(RuntimeError):
    """The archive answered something unusable (names the URL, what was expected and what came)."""


@dataclass(frozen=True)
class Region:
    """A box on the sky, degrees."""

    ra_min: float
    ra_max: float
    dec_min: float
    dec_max: float

    @classmethod
    def parse(cls, text: str) -> Region:
        try:
            values = [float(v) for v in text.split(",")]
        except ValueError:
            values = []
        if len(values) != 4 or not (values[0] < values[1] and -90 <= values[2] < values[3] <= 90):
            raise ValueError(f"--region takes RA_MIN,RA_MAX,DEC_MIN,DEC_MAX in degrees (min < max), got {text!r}")
        return cls(*values)


def selection_sql(page_size: int, after_specobjid: int = 0, region: Region | None = None) -> str:
    """One page of the Main Galaxy Sample selection, in ``specObjID`` order after ``after_specobjid``."""
    spec = {"specObjID", "z"}
    columns = ", ".join(f"{'s' if c in spec else 'p'}.{c}" for c in CATALOGUE_COLUMNS)
    where = [
        "s.class = 'GALAXY'", "s.zWarning = 0", "s.sciencePrimary = 1",
        f"(s.legacy_target1 & {MGS_TARGET_BIT}) != 0",
        f"p.petroMag_r - p.extinction_r <= {MGS_PETRO_R_LIMIT_MAG}",
        f"s.z > 0 AND s.z < {DEFAULT_Z_MAX}",
        f"s.specObjID > {int(after_specobjid)}",
    ]
    if region is not None:
        where.append(f"p.ra BETWEEN {region.ra_min} AND {region.ra_max} "
                     f"AND p.dec BETWEEN {region.dec_min} AND {region.dec_max}")
    return (f"SELECT TOP {int(page_size)} {columns} FROM SpecObj AS s JOIN PhotoObj AS p ON s.bestObjID = p.objID "
            f"WHERE {' AND '.join(where)} ORDER BY s.specObjID")


# -- HTTP -------------------------------------------------------------------------------------------------

@dataclass
class Fetcher:
    """HTTP GETs with retries (5xx, 429, connection errors; exponential backoff, ``Retry-After`` honoured)."""

    retries: int = 5
    backoff_s: float = 1.0
    timeout_s: float = 120.0
    client: Any = None

    def __post_init__(self) -> None:
        import httpx

        self.client = self.client or httpx.Client(timeout=self.timeout_s, follow_redirects=True,
                                                  headers={"User-Agent": "photoz sdss-dataset"})

    def get(self, url: str, params: dict[str, Any] | None = None, headers: dict[str, str] | None = None,
            ok: tuple[int, ...] = (200,)) -> Any:
        import httpx

        for attempt in range(self.retries + 1):
            try:
                response = self.client.get(url, params=params, headers=headers)
            except httpx.TransportError as exc:
                problem, wait = f"{type(exc).__name__}: {exc}", self.backoff_s * 2 ** attempt
            else:
                if response.status_code in ok:
                    return response
                if response.status_code not in RETRY_STATUSES:
                    raise SDSSArchiveError(f"{url}: HTTP {response.status_code} ({response.text[:200]!r})")
                problem = f"HTTP {response.status_code}"
                after = response.headers.get("retry-after", "")
                wait = float(after) if after.isdigit() else self.backoff_s * 2 ** attempt
            if attempt == self.retries:
                raise SDSSArchiveError(f"{url}: {problem}, still after {self.retries} retries")
            time.sleep(wait)
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.client.close()


# -- selection -----------------------------------------------------------------------------------------

def parse_skyserver_csv(text: str, url: str) -> list[dict[str, str]]:
    """SkyServer's CSV (``#Table1``, a header line, rows) as dicts; an error page is an :class:`SDSSArchiveError`."""
    lines = text.splitlines()
    if lines and lines[0].startswith("#Table"):
        lines = lines[1:]
    rows = list(csv.DictReader(lines))
    header = set(rows[0]) if rows else set(next(csv.reader(lines[:1]), []))
    missing = [c for c in CATALOGUE_COLUMNS if c not in header]
    if missing:
        raise SDSSArchiveError(f"{url}: expected a CSV table with columns {', '.join(CATALOGUE_COLUMNS)}; "
                               f"got {text[:300]!r}")
    return rows


#: Column types of the catalogue held in memory (the rest float32): ids as unsigned 64-bit integers.
COLUMN_TYPES = {"specObjID": np.uint64, "objID": np.uint64, "run": np.int64, "rerun": np.int64,
                "camcol": np.int64, "field": np.int64, "ra": np.float64, "dec": np.float64, "z": np.float64}
Catalogue = dict[str, np.ndarray]


def to_columns(rows: list[dict[str, str]]) -> Catalogue:
    """SkyServer rows as typed columns (a 500k-galaxy selection is ~150 MB this way, not gigabytes of dicts)."""
    try:
        return {name: np.array([int(r[name]) if COLUMN_TYPES.get(name) in (np.uint64, np.int64) else float(r[name])
                                for r in rows]).astype(COLUMN_TYPES.get(name, np.float32))
                for name in CATALOGUE_COLUMNS}
    except ValueError as exc:
        raise SDSSArchiveError(f"SkyServer returned a value that is not a number: {exc}") from None


def select(fetcher: Fetcher, skyserver: str, parts: Path, n: int | None, region: Region | None, page_size: int,
           log: Callable[[str], None]) -> Catalogue:
    """The selected galaxies in ``specObjID`` order, paged; pages already in ``parts`` are not asked again."""
    pages: list[Catalogue] = []
    have, page = 0, 0
    while n is None or have < n:
        path = parts / f"query-{page:05d}.csv"
        size = page_size if n is None else min(page_size, n - have)
        if path.exists():  # asked before this run was interrupted (the settings are the same: see build)
            got = to_columns(parse_skyserver_csv(path.read_text(), str(path)))
        else:
            after = int(pages[-1]["specObjID"][-1]) if have else 0
            text = fetcher.get(skyserver, params={"cmd": selection_sql(size, after, region), "format": "csv"}).text
            got = to_columns(parse_skyserver_csv(text, skyserver))
            write_atomic(path, text.encode())
            log(f"  selection page {page + 1}: {len(got['z'])} galaxies (after specObjID {after})")
        if len(got["z"]):
            pages.append(got)
        have += len(got["z"])
        page += 1
        if len(got["z"]) < size:  # the selection is exhausted
            break
    return {name: np.concatenate([p[name] for p in pages]) if pages else np.zeros(0, COLUMN_TYPES.get(name, np.float32))
            for name in CATALOGUE_COLUMNS}


# -- frames --------------------------------------------------------------------------------------------

FRAME_FILE = re.compile(r"frame-(?P<band>[a-z])-(?P<run>\d{6})-(?P<camcol>\d)-(?P<field>\d{4})\.fits\.bz2")


def frame_name(band: str, run: int, camcol: int, field_: int) -> str:
    return f"frame-{band}-{run:06d}-{camcol}-{field_:04d}.fits.bz2"


def frame_url(sas: str, band: str, run: int, camcol: int, field_: int, rerun: int = RERUN) -> str:
    return f"{sas.rstrip('/')}/{rerun}/{run}/{camcol}/{frame_name(band, run, camcol, field_)}"


def check_frame(data: bytes, where: str) -> None:
    """A whole, readable frame: bzip2's block checksums over every byte, then a FITS image inside."""
    from astropy.io import fits

    try:
        raw = bz2.decompress(data)
        with fits.open(io.BytesIO(raw)) as hdul:
            if hdul[0].data is None or hdul[0].data.ndim != 2:
                raise SDSSArchiveError(f"{where}: no 2-D image in the primary HDU")
    except (OSError, ValueError, EOFError) as exc:
        raise SDSSArchiveError(f"{where}: damaged frame ({exc})") from None


class FrameCache:
    """Frames on disk under ``root/rerun/run/camcol/``: fetched once, resumed, checked; a missing frame is None."""

    def __init__(self, root: Path, sas: str, fetcher: Fetcher, concurrency: int = 4) -> None:
        self.root, self.sas, self.fetcher, self.concurrency = Path(root), sas, fetcher, concurrency
        self.downloaded_bytes = 0

    def prune(self, keep: set[tuple[int, int, int]]) -> None:
        """Delete the cached frames of every field not in ``keep`` (run, camcol, field)."""
        for path in self.root.glob(f"{RERUN}/*/*/frame-*"):
            match = FRAME_FILE.match(path.name)
            if match and (int(match["run"]), int(match["camcol"]), int(match["field"])) not in keep:
                path.unlink(missing_ok=True)

    def path(self, band: str, run: int, camcol: int, field_: int) -> Path:
        return self.root / str(RERUN) / str(run) / str(camcol) / frame_name(band, run, camcol, field_)

    def fetch(self, band: str, run: int, camcol: int, field_: int) -> Path | None:
        path = self.path(band, run, camcol, field_)
        if path.exists():
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        missing = path.with_name(path.name + ".missing")
        if missing.exists():
            return None
        url = frame_url(self.sas, band, run, camcol, field_)
        part = path.with_name(path.name + ".part")
        have = part.stat().st_size if part.exists() else 0
        response = self.fetcher.get(url, headers={"Range": f"bytes={have}-"} if have else None, ok=(200, 206, 404))
        if response.status_code == 404:
            missing.touch()  # the archive has no such frame: remembered, not asked again
            return None
        body = response.content
        if response.status_code == 206:
            total = int(response.headers.get("content-range", "*/0").rsplit("/", 1)[-1] or 0)
            data = part.read_bytes() + body
        else:  # the whole file (a server without ranges starts over)
            total = int(response.headers.get("content-length", len(body)))
            data = body
        self.downloaded_bytes += len(body)
        if len(data) != total:
            part.write_bytes(data)  # kept: the next attempt resumes from here
            raise SDSSArchiveError(f"{url}: {len(data)} bytes received of the {total} declared")
        check_frame(data, url)
        write_atomic(path, data)
        part.unlink(missing_ok=True)
        return path

    def fetch_field(self, run: int, camcol: int, field_: int) -> dict[str, Path] | None:
        """All five bands of a field (at most ``concurrency`` downloads at once); None if the archive lacks any."""
        with ThreadPoolExecutor(self.concurrency) as pool:
            paths = list(pool.map(lambda b: self.fetch(b, run, camcol, field_), BANDS))
        if any(p is None for p in paths):
            return None
        return dict(zip(BANDS, paths, strict=True))  # type: ignore[arg-type]



def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
