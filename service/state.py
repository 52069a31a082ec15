"""What both protocols share: the app's state, auth, early refusal, and running validated cutouts.

``/v1/predict`` (:mod:`photoz.service.app`) and the Open Inference Protocol's
``/v2/models/{name}/infer`` (:mod:`photoz.service.oip`) differ in how a body
becomes cutouts and how results become a response; everything between (the
key check, the refusal from headers under overload, the batcher, deadlines,
dropped work when the client goes away, objects whose PDF is not finite,
metrics) is here, once.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Scope

from photoz.formats.cutouts import Cutouts
from photoz.formats.errors import InputError
from photoz.formats.results import Results
from photoz.model import priors
from photoz.model.isolation import ROW_ERRORS
from photoz.model.priors import Prior
from photoz.service.batcher import Reservation
from photoz.service.engine import ServingEngine
from photoz.service.errors import Draining, QueueFull, Unauthorized
from photoz.service.ingest import OBJECTS_HEADER, InflightBodies, admit, submit_unless_disconnected
from photoz.service.routes import is_prediction_path
from photoz.service.settings import Settings

log = logging.getLogger("photoz.service")
T = TypeVar("T")

#: Refusals held at once at most (each holds a connection; beyond, refusals go out at once), and the longest hold.
MAX_HELD_REFUSALS, MAX_HOLD_S = 4096, 10.0
#: Status recorded for a client that went away before its answer (nginx's convention).
CLIENT_CLOSED = 499
#: Responses up to this many objects are encoded on the event loop (a thread hop costs more).
INLINE_OBJECTS = 16
#: The headers :func:`refuse_early` reads.
ADMISSION_HEADERS = (b"content-length", OBJECTS_HEADER.encode())


@dataclass
class ServiceState:
    """One app's settings, engine (None until loaded) and lifecycle flags."""

    settings: Settings
    inflight: InflightBodies
    key_digests: tuple[bytes, ...] = ()
    engine: ServingEngine | None = None
    draining: bool = False
    held_refusals: int = 0

    @property
    def ready(self) -> bool:
        return self.engine is not None and not self.draining

    def begin_hold(self) -> float:
        """Seconds to hold a refusal before sending it (0: at once), counted as held until :meth:`end_hold`.

        Held on a timer (no CPU): a client that ignores Retry-After then re-sends at most once per hold,
        instead of as fast as the server can refuse. The hold is ``refusal_delay_ms``, longer when more
        refusals are held than ``max_refusals_per_s`` can answer in that time (each waits its turn: refusal
        work stays bounded however many clients storm), at most ``MAX_HOLD_S``.
        """
        s = self.settings
        delay = s.refusal_delay_ms / 1000
        if s.max_refusals_per_s > 0:
            delay = min(max(delay, self.held_refusals / s.max_refusals_per_s), MAX_HOLD_S)
        if delay <= 0 or self.held_refusals >= MAX_HELD_REFUSALS:
            return 0.0
        self.held_refusals += 1
        return delay

    def end_hold(self) -> None:
        self.held_refusals -= 1

    async def hold_refusal(self) -> None:
        """:meth:`begin_hold` as an awaitable (the ASGI path; uvicorn's protocol holds with a timer instead)."""
        delay = self.begin_hold()
        if delay:
            try:
                await asyncio.sleep(delay)
            finally:
                self.end_hold()

    def refusal_for(self, method: bytes, path: bytes, headers: list[tuple[bytes, bytes]]) -> \
            QueueFull | Reservation | None:
        """Admission of a prediction request from its request line and headers alone: the 429 when the queue
        cannot take it, else the reservation that counts its cutouts as incoming until its body is decoded;
        None for any other request. Both the ASGI path and uvicorn's protocol ask here."""
        engine = self.engine
        if engine is None or self.draining or method != b"POST" or not is_prediction_path(path):
            return None
        wanted = {name.decode("latin-1"): value.decode("latin-1") for name, value in headers
                  if name in ADMISSION_HEADERS}
        try:
            return admit(wanted, engine.batcher, engine.geometry)
        except QueueFull as exc:
            engine.metrics.refuse_early()
            return exc

    def cut_off_queued(self) -> None:
        """At the drain deadline: queued work that cannot finish gets 503 + Retry-After, not a dropped connection."""
        if self.engine is not None:
            aborted = self.engine.batcher.abort_queued(Draining("the server is shutting down: this work was still "
                                                                "queued at the drain deadline; retry elsewhere"))
            if aborted:
                log.warning("drain deadline: %d queued cutouts answered 503", aborted)

    def running_engine(self) -> ServingEngine:
        """The engine, or 503 while loading or draining."""
        if self.engine is None or self.draining:
            raise Draining("the server is shutting down" if self.draining else "the model is still loading")
        return self.engine

    def observe(self, status: int, started: float) -> None:
        """Count one prediction request (either protocol) and its latency."""
        if self.engine is not None:
            self.engine.metrics.count_request(status, time.perf_counter() - started)


def state_of(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.photoz
    return state


def key_digest(key: str | bytes) -> bytes:
    """Keys are kept and compared as SHA-256 digests of their bytes (any length, any bytes, constant time)."""
    return hashlib.sha256(key.encode("utf-8") if isinstance(key, str) else key).digest()


async def require_key(request: Request) -> None:  # async: a sync dependency costs a thread hop
    """401 unless the request carries ``Authorization: Bearer <key>`` with a configured key."""
    digests = state_of(request).key_digests
    if not digests:
        return
    raw = request.headers.get("authorization", "").encode("latin-1")  # the bytes as sent (HTTP headers)
    scheme, _, token = raw.partition(b" ")
    candidate = key_digest(token.strip())
    # every key compared, so the time taken does not say which key came close
    matches = [hmac.compare_digest(candidate, digest) for digest in digests]
    if scheme.lower() != b"bearer" or not any(matches):
        raise Unauthorized()


#: Where a request's :class:`~photoz.service.batcher.Reservation` travels with it (the ASGI scope).
RESERVATION = "photoz.reservation"


async def refuse_early(scope: Scope) -> QueueFull | None:
    """Under overload, the 429 for a request from its headers alone, held on a timer before it goes out: no
    Request object, no auth, no body read (``Connection: close``), so a retry storm costs the server as little
    as it can (docs/security.md). Every prediction route starts here; each renders the refusal its own way.
    Under ``photoz serve`` uvicorn's protocol has decided already (:mod:`photoz.service.server`): refusals
    never reach the app, admitted requests carry their reservation; this is the same decision for any other
    ASGI server."""
    if RESERVATION in scope:
        return None
    state: ServiceState = scope["app"].state.photoz
    path = scope.get("raw_path") or scope["path"].encode()
    decision = state.refusal_for(scope["method"].encode(), path, scope["headers"])
    if isinstance(decision, QueueFull):
        await state.hold_refusal()
        return decision
    if decision is not None:
        scope[RESERVATION] = decision
    return None


def release_reservation(scope: Scope) -> None:
    """Stop counting the request's cutouts as incoming (before they are queued, or when it ends)."""
    reservation = scope.pop(RESERVATION, None)
    if reservation is not None:
        reservation.release()


async def answer(request: Request, work: Callable[[], Awaitable[Response]],
                 render: Callable[[BaseException], Response]) -> Response:
    """Run a prediction request's ``work``: any error becomes its protocol's response (``render``), none takes
    the server down; a client gone away is recorded as 499; every outcome is counted with its latency."""
    started = time.perf_counter()
    state = state_of(request)
    try:
        response = await work()
    except asyncio.CancelledError:  # the client went away; its queued work is dropped
        state.observe(CLIENT_CLOSED, started)
        raise
    except ClientDisconnect:  # gone while still sending the body
        response = Response(status_code=CLIENT_CLOSED)
    except Exception as exc:
        response = render(exc)
    finally:
        release_reservation(request.scope)
    state.observe(response.status_code, started)
    return response


async def predict_cutouts(request: Request, engine: ServingEngine, cutouts: Cutouts, timeout_s: float,
                          request_id: str | None = None) -> Results | None:
    """The valid cutouts through the batcher: their results (an object the model failed on alone, or whose PDF
    comes out non-finite, becomes that object's problem), or None if the client went away first (its queued
    work is dropped). ``request_id`` (default: the X-Request-ID header, else a number) names it in the log."""
    valid = np.array([p is None for p in cutouts.problems], dtype=bool)
    n_bins = engine.bundle.metadata.bins.n_bins
    outputs: dict[str, np.ndarray] | None = {"probs": np.zeros((0, n_bins), np.float32)}
    release_reservation(request.scope)  # from here the queue counts the cutouts themselves
    if valid.any():
        images, ebv = (cutouts.images, cutouts.ebv) if valid.all() else (cutouts.images[valid], cutouts.ebv[valid])
        outputs = await submit_unless_disconnected(request, engine.batcher, images, ebv, timeout_s,
                                                   _request_id(request, request_id))
        if outputs is None:
            return None
        outputs = _refuse_unanswered(cutouts, valid, outputs)
    rejected = sum(p is not None for p in cutouts.problems)
    if rejected:
        engine.metrics.objects_rejected.inc(rejected)
    assert outputs is not None
    probs, flag_bits = outputs.pop("probs"), outputs.pop("flag_bits", None)
    return Results(engine.bundle, cutouts.ids, cutouts.problems, probs, outputs, flag_bits)


_request_numbers = itertools.count(1)


def _request_id(request: Request, given: str | None) -> str:
    """The id the client gave (the protocol's, else X-Request-ID; printable, at most 64 characters), else this
    process's next number."""
    given = given or request.headers.get("x-request-id")
    if given and given.isprintable():
        return given[:64]
    return f"{os.getpid()}-{next(_request_numbers)}"


async def with_prior(results: Results, prior: Prior, train: np.ndarray | None) -> Results:
    """:func:`apply_prior`, on the event loop for a few objects, in a worker thread for more."""
    if prior.is_identity or len(results.ids) <= INLINE_OBJECTS:
        return apply_prior(results, prior, train)
    return await asyncio.to_thread(apply_prior, results, prior, train)


async def encoded(results: Results, encode: Callable[..., T], *args: Any) -> T:
    """``encode(results, *args)``: on the event loop for a few objects, in a worker thread for more."""
    if len(results.ids) <= INLINE_OBJECTS:
        return encode(results, *args)
    return await asyncio.to_thread(encode, results, *args)


def resolve_prior(engine: ServingEngine, name: str | None, edges: Any = None, weights: Any = None,
                  selection_edges: Any = None, selection_completeness: Any = None) -> Prior:
    """The prior a request asked for (``prior``, ``prior_edges``, ``prior_weights``, and the sample's selection,
    ``selection_edges``, ``selection_completeness``), or a 422 naming the field."""
    try:
        return priors.resolve(name, engine.bundle.metadata.bins, engine.train_prior, edges, weights,
                              selection_edges, selection_completeness)
    except priors.PriorError as exc:
        raise InputError(exc.field, exc.expected, exc.received) from None


def check_prior_population(prior: Prior, cutouts: Cutouts) -> None:
    """``prior=self`` on too few valid objects: the 422 before any inference."""
    valid = sum(p is None for p in cutouts.problems)
    if prior.name == "self" and valid < priors.MIN_OBJECTS_SELF:
        raise InputError("prior", f"prior=self on at least {priors.MIN_OBJECTS_SELF} valid objects (their n(z) "
                                  "is estimated from their PDFs); send more, or a named or custom prior",
                         f"{valid} valid objects")


def apply_prior(results: Results, prior: Prior, train: np.ndarray | None) -> Results:
    """The results under ``prior`` (photoz.model.priors): PDFs re-weighted, estimates and the PDF's flag
    recomputed; an object the prior excludes becomes that object's error. The answer names the prior."""
    if prior.is_identity:
        results.prior = prior.describe()
        return results
    assert train is not None  # resolve() gives only the training prior to a bundle without its n(z)
    try:
        concrete = priors.for_population(prior, results.probs, train)
    except priors.PriorError as exc:  # fewer valid objects than the check before inference saw (model failures)
        raise InputError(exc.field, exc.expected, exc.received) from None
    assert results.flag_bits is not None
    outputs, ok = priors.apply({"probs": results.probs, **results.estimates, "flag_bits": results.flag_bits},
                               concrete, train, results.bundle.metadata.bins)
    problems = list(results.problems)
    for k, i in enumerate(np.flatnonzero(results.valid)):
        if not ok[k]:
            problems[i] = priors.ZERO_OVERLAP
    probs, flag_bits = outputs.pop("probs")[ok], outputs.pop("flag_bits")[ok]
    return Results(results.bundle, results.ids, problems, probs, {k: v[ok] for k, v in outputs.items()}, flag_bits,
                   concrete.describe())


def _refuse_unanswered(cutouts: Cutouts, valid: np.ndarray, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Objects the model failed on alone (``row_errors``) and objects whose PDF came out non-finite become that
    object's error instead of a PDF of NaNs marked valid; the other objects' outputs are returned."""
    errors = outputs.pop(ROW_ERRORS, None)
    if np.isfinite(np.add.reduce(outputs["probs"], axis=None)):  # every row finite (probabilities cannot overflow)
        return outputs
    answered = np.isfinite(outputs["probs"]).all(axis=1)
    for k, i in enumerate(np.flatnonzero(valid)):
        if not answered[k]:
            cutouts.problems[i] = errors[k] if errors is not None and errors[k] is not None else \
                "the network's output is not finite for this cutout"
    return {key: value[answered] for key, value in outputs.items()}
