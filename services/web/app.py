"""The HTTP gateway: the page, its JSON API (OpenAPI at ``/openapi.json``), dataset images and reports.

Routes only convert HTTP to calls of ``Gateway`` and errors to statuses; the work is in the core and
the services behind it. Security, in one place:

- with ``WEB_AUTH_TOKEN`` set, every ``/api`` and ``/reports`` request carries that bearer token: in
  the ``Authorization`` header, or, for what the browser fetches by itself (``<img>``, the report
  frame, GET only), in the ``retrieval_token`` cookie the page sets from its session storage. State-
  changing requests (POST) accept the header only, so another site cannot make a browser send them;
- the caller's token goes on to the services (they check it too);
- uploads are bounded before they are read (``Content-Length``, then a byte count while reading);
- the page and everything else are served with a Content-Security-Policy that allows nothing from
  another origin (no CDN: FastAPI's own ``/docs`` pages load theirs, so they are off; the schema is
  at ``/openapi.json``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import grpc
from fastapi import Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from services.common.errors import ServiceError
from services.web import gateway as core
from services.web.config import WebSettings
from services.web.errors import http_status, sentence
from services.web.schemas import (
    CollectionView,
    DatasetView,
    ErrorBody,
    Health,
    Labels,
    ModelView,
    RunView,
    SearchPage,
    StartedRun,
    StartRun,
    Summary,
)

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
TOKEN_COOKIE = "retrieval_token"
UPLOAD_PATH = "/api/search/image"
FORM_OVERHEAD = 64 * 1024  # multipart boundaries and the small fields beside the file
PAGE_CSP = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
            "connect-src 'self'; frame-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
            "frame-ancestors 'self'")
# Reports are our own generated HTML (inline styles, no script): they may show only their own figures.
REPORT_CSP = "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; frame-ancestors 'self'"
_STATUS_CODES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                 405: "INVALID_ARGUMENT", 409: "FAILED_PRECONDITION", 413: "RESOURCE_EXHAUSTED",
                 429: "RESOURCE_EXHAUSTED", 503: "UNAVAILABLE"}

ASGIApp = Callable[[MutableMapping[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
                   Awaitable[None]]
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text} for code, text in (
        (400, "a bad request (the sentence says what)"), (401, "a missing or wrong bearer token"),
        (404, "no such collection, run, image or file"), (413, "an upload over the limits"),
        (503, "a service is not reachable"))}


def _error(status: int, message: str, code: str) -> JSONResponse:
    return JSONResponse({"error": message, "code": code}, status_code=status)


class UploadLimit:
    """Refuses uploads over the limit before reading them (Content-Length), and while reading them
    (chunked bodies are counted), so an upload never costs more than the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _message(self) -> str:
        return f"The upload is larger than the limit of {self.max_bytes / 1e6:.1f} MB."

    async def __call__(self, scope: MutableMapping[str, Any], receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] != "http" or scope["path"] != UPLOAD_PATH:
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes + FORM_OVERHEAD
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await _error(413, self._message(), "RESOURCE_EXHAUSTED")(scope, receive, send)
            return
        seen = 0

        async def counted() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise HTTPException(413, self._message())
            return message

        await self.app(scope, counted, send)


class SecurityHeaders:
    """Adds the Content-Security-Policy (reports get a stricter one) and no-sniff to every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: MutableMapping[str, Any], receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        csp = REPORT_CSP if scope["path"].startswith("/reports/") else PAGE_CSP

        async def with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                extra = [(b"content-security-policy", csp.encode()), (b"x-content-type-options", b"nosniff"),
                         (b"referrer-policy", b"no-referrer"), (b"x-frame-options", b"SAMEORIGIN")]
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, with_headers)


def caller(request: Request) -> str | None:
    """The caller's bearer token; checked here when this gateway has one (``WEB_AUTH_TOKEN``)."""
    expected: str | None = request.app.state.settings.auth_token
    header = request.headers.get("authorization", "")
    token: str | None = None
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise HTTPException(401, "The Authorization header must be 'Bearer <token>'.")
        token = value.strip()
    elif request.method in ("GET", "HEAD"):
        token = request.cookies.get(TOKEN_COOKIE) or None
    if expected and not (token and hmac.compare_digest(token.encode(), expected.encode())):
        raise HTTPException(401, "This page needs the access token: enter it under 'Access token'."
                            if token is None else "The access token is wrong: enter the right one under "
                                                  "'Access token'.")
    return token


Token = Annotated[str | None, Depends(caller)]


def create_app(settings: WebSettings, gateway: core.Gateway | None = None) -> FastAPI:
    """The gateway's FastAPI application (``gateway`` defaults to one built from ``settings``)."""
    gw = gateway or core.Gateway(settings)
    watches = threading.BoundedSemaphore(settings.max_watch_streams)
    app = FastAPI(title="Image retrieval gateway", version="1", docs_url=None, redoc_url=None,
                  description="The search page's JSON API over the encoder, search and evaluator services. Send "
                              "'Authorization: Bearer <token>' when the gateway or the services need a token. "
                              "Errors are JSON {error: sentence, code}.")
    app.state.gateway = gw
    app.state.settings = settings

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        status = http_status(exc)
        if status >= 500 and exc.code != grpc.StatusCode.UNAVAILABLE:
            log.warning("%s %s: %s", request.method, request.url.path, exc.message)
        return _error(status, sentence(exc), exc.code.name)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "The request was refused."
        if exc.status_code == 404 and message == "Not Found":
            message = f"There is nothing at {request.url.path}."
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}."
        return _error(exc.status_code, message, _STATUS_CODES.get(exc.status_code, "UNKNOWN"))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for error in exc.errors()[:3]:
            where = ".".join(str(p) for p in error.get("loc", ()) if p not in ("query", "body", "path"))
            problems.append(f"{where or 'the request'}: {error.get('msg', 'invalid')}")
        return _error(400, "Invalid request: " + "; ".join(problems) + ".", "INVALID_ARGUMENT")

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return _error(500, "The gateway failed on this request (an internal error; its log has the details).",
                      "INTERNAL")

    # -- the page ---------------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # -- services ---------------------------------------------------------------------------------

    @app.get("/api/health", response_model=Health, tags=["services"])
    def health(token: Token) -> Health:
        """Whether the encoder, search and evaluator services are serving, and the gateway's limits."""
        return Health(services=gw.health(token), auth_required=bool(settings.auth_token),
                      max_upload_bytes=settings.max_upload_bytes, max_upload_pixels=settings.max_upload_pixels,
                      max_k=settings.max_k)

    @app.get("/api/models", response_model=list[ModelView], responses=ERRORS, tags=["services"])
    def models(token: Token) -> list[ModelView]:
        """The encoder's models; ``text`` says whether a model takes text queries."""
        return gw.models(token)

    @app.get("/api/collections", response_model=list[CollectionView], responses=ERRORS, tags=["search"])
    def collections(token: Token) -> list[CollectionView]:
        """The search service's collections."""
        return gw.collections(token)

    @app.get("/api/collections/{name}/labels", response_model=Labels, responses=ERRORS, tags=["search"])
    def labels(name: str, token: Token) -> Labels:
        """The labels used in a collection (for the label filter)."""
        return gw.labels(token, name)

    def _labels(text: str) -> list[str]:
        return [label for label in (x.strip() for x in text.split(",")) if label][:50]

    @app.get("/api/search", response_model=SearchPage, responses=ERRORS, tags=["search"])
    def search(
        token: Token,
        collection: Annotated[str, Query(min_length=1, max_length=255)],
        query: Annotated[str, Query(min_length=3, max_length=2000,
                                    description="upload:<hash> (from POST /api/search/image), text:<words> or "
                                                "id:<point id> (search with a stored image)")],
        model: Annotated[str, Query(max_length=255, description="'' or the collection's model")] = "",
        k: Annotated[int, Query(ge=1, le=1000, description="results in all")] = 48,
        labels: Annotated[str, Query(max_length=4000, description="comma-separated; at least one must match")] = "",
        duplicates: Annotated[float | None, Query(ge=0.0, le=1.0, description="hide results at or above this "
                                                  "similarity to a better-ranked shown one")] = None,
        offset: Annotated[int, Query(ge=0, le=1000)] = 0,
        limit: Annotated[int, Query(ge=1, le=200, description="results in this page")] = 24,
    ) -> SearchPage:
        """One page of a search: by an uploaded image, a text, or a stored image ("search with this")."""
        return gw.search(token, collection, model, core.Query.parse(query), k, _labels(labels), duplicates, offset,
                         limit)

    @app.post(UPLOAD_PATH, response_model=SearchPage, responses=ERRORS, tags=["search"])
    def search_image(
        token: Token,
        file: Annotated[UploadFile, File(description="the query image")],
        collection: Annotated[str, Form(min_length=1, max_length=255)],
        model: Annotated[str, Form(max_length=255)] = "",
        k: Annotated[int, Form(ge=1, le=1000)] = 48,
        labels: Annotated[str, Form(max_length=4000)] = "",
        duplicates: Annotated[float | None, Form(ge=0.0, le=1.0)] = None,
        limit: Annotated[int, Form(ge=1, le=200)] = 24,
    ) -> SearchPage:
        """Searches with an uploaded image; the answer's ``query`` (upload:<hash>) repeats the search with
        GET /api/search while the gateway remembers the image."""
        data = file.file.read(settings.max_upload_bytes + 1)
        query = gw.remember_upload(token, collection, model, data)
        return gw.search(token, collection, model, query, k, _labels(labels), duplicates, 0, limit)

    @app.get("/api/images/{dataset}/{path:path}", responses=ERRORS, tags=["files"],
             response_class=FileResponse)
    def image(dataset: str, path: str, token: Token) -> FileResponse:
        """An image of a served dataset (never a file outside its root)."""
        served = gw.datasets.image(dataset, path)
        return FileResponse(served.path, media_type=served.media_type,
                            headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/api/datasets", response_model=list[DatasetView], tags=["files"])
    def datasets(token: Token) -> list[DatasetView]:
        """The datasets this gateway serves (and can start runs on), by name."""
        return [DatasetView(name=name) for name in sorted(gw.datasets.roots())]

    # -- runs and reports -------------------------------------------------------------------------

    @app.get("/api/runs", response_model=list[RunView], responses=ERRORS, tags=["runs"])
    def runs(token: Token, limit: Annotated[int, Query(ge=1, le=200)] = 50) -> list[RunView]:
        """The evaluator's latest runs, newest first."""
        return gw.runs(token, limit)

    @app.post("/api/runs", response_model=StartedRun, responses=ERRORS, tags=["runs"])
    def start_run(request: StartRun, token: Token) -> StartedRun:
        """Starts a benchmark run on a served dataset."""
        return StartedRun(run_id=gw.start_run(token, request))

    @app.get("/api/runs/{run_id}", response_model=RunView, responses=ERRORS, tags=["runs"])
    def run(run_id: str, token: Token) -> RunView:
        return gw.run(token, run_id)

    @app.post("/api/runs/{run_id}/cancel", response_model=RunView, responses=ERRORS, tags=["runs"])
    def cancel(run_id: str, token: Token) -> RunView:
        return gw.cancel(token, run_id)

    @app.get("/api/runs/{run_id}/events", responses=ERRORS, tags=["runs"], response_class=StreamingResponse)
    async def events(run_id: str, request: Request, token: Token) -> StreamingResponse:
        """Server-sent events of a run's progress (the evaluator's WatchRun): ``run`` events with the run
        as JSON, then ``end``; ``error`` with {error, code} when the watch fails."""
        await asyncio.to_thread(gw.run, token, run_id)  # an unknown run is a 404, not an empty stream
        if not watches.acquire(blocking=False):
            raise HTTPException(429, f"Too many progress streams are open (at most {settings.max_watch_streams}); "
                                     "close another page's report view.")
        try:
            client = gw.watcher(token)
        except BaseException:
            watches.release()
            raise
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()

        def put(event: str, data: str) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody listens any more
                loop.call_soon_threadsafe(queue.put_nowait, (event, data))

        def pump() -> None:
            try:
                for view in gw.watch(client, run_id):
                    put("run", view.model_dump_json())
                put("end", "{}")
            except ServiceError as exc:
                put("error", json.dumps({"error": sentence(exc), "code": exc.code.name}))
            except Exception:
                log.exception("watching run %s failed", run_id)
                put("error", json.dumps({"error": "Watching the run failed (an internal error).",
                                         "code": "INTERNAL"}))

        threading.Thread(target=pump, name=f"watch-{run_id}", daemon=True).start()

        async def stream() -> AsyncIterator[str]:
            try:
                while True:
                    try:
                        event, data = await asyncio.wait_for(queue.get(), timeout=15.0)
                    except TimeoutError:
                        yield ": still watching\n\n"  # keeps proxies from closing an idle stream
                        continue
                    yield f"event: {event}\ndata: {data}\n\n"
                    if event in ("end", "error"):
                        return
            finally:
                client.close()  # ends the evaluator stream the thread may still be blocked on
                watches.release()

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    @app.get("/api/reports", response_model=list[Summary], tags=["runs"])
    def reports(token: Token) -> list[Summary]:
        """The aggregated reports (summary.html) in the report directory, newest first."""
        return [Summary(path=path, url=f"/reports/{quote(path)}", modified=modified)
                for path, modified in gw.reports.summaries()]

    @app.get("/reports/{path:path}", responses=ERRORS, tags=["files"], response_class=FileResponse)
    def report_file(path: str, token: Token) -> Response:
        """A file of the report directory, read-only (HTML, Markdown, JSON, figures)."""
        served = gw.reports.file(path)
        return FileResponse(served.path, media_type=served.media_type, headers={"Cache-Control": "no-cache"})

    app.add_middleware(UploadLimit, max_bytes=settings.max_upload_bytes)
    app.add_middleware(SecurityHeaders)
    return app
