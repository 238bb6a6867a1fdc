"""The gateway's core: the page's questions answered through the typed clients, in plain Python.

No retrieval logic lives here: vectors come from the encoder, neighbours from the search service,
runs from the evaluator. What the gateway adds is what a page needs around them: the caller's bearer
token passed on (one set of connections per token), limits on uploads checked before the encoder
sees them, results paged for lazy loading, uploaded queries remembered so a search by upload can be
reloaded and shared, and near-duplicates hidden (documented in ``hide_near_duplicates``).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import logging
import threading
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import numpy as np
from cachetools import LRUCache, TTLCache
from retrieval.v1 import common_pb2, encoder_pb2, evaluator_pb2, search_pb2

from services.common.clients import (
    ClientTLS,
    EncoderClient,
    Endpoint,
    EvaluatorClient,
    Hit,
    RetryPolicy,
    SearchClient,
    SearchFilter,
)
from services.common.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable
from services.web.config import WebSettings
from services.web.errors import WHAT_STILL_WORKS, error_for
from services.web.files import DatasetRoots, ReportFiles
from services.web.schemas import (
    CollectionView,
    HitView,
    Labels,
    ModelView,
    ReportLink,
    RunView,
    SearchPage,
    ServiceHealth,
    StartRun,
)

log = logging.getLogger(__name__)

QUERY_KINDS = ("upload", "text", "id")
_RUN_STATES = {evaluator_pb2.RUN_STATE_QUEUED: "queued", evaluator_pb2.RUN_STATE_RUNNING: "running",
               evaluator_pb2.RUN_STATE_SUCCEEDED: "succeeded", evaluator_pb2.RUN_STATE_FAILED: "failed",
               evaluator_pb2.RUN_STATE_CANCELLED: "cancelled", evaluator_pb2.RUN_STATE_UNSPECIFIED: "unknown"}
_PROTOCOLS = {"leave_one_out": evaluator_pb2.PROTOCOL_LEAVE_ONE_OUT,
              "catalogue_query": evaluator_pb2.PROTOCOL_CATALOGUE_QUERY}
_PROTOCOL_NAMES = {v: k for k, v in _PROTOCOLS.items()}
_INDEX_STATUS = {search_pb2.INDEX_STATUS_GREEN: "green", search_pb2.INDEX_STATUS_YELLOW: "yellow",
                 search_pb2.INDEX_STATUS_RED: "red"}


@dataclass(frozen=True)
class Query:
    """What a search asks with: an uploaded image (by its hash), a text, or a stored point (by id)."""

    kind: str
    value: str

    @classmethod
    def parse(cls, text: str) -> Query:
        """``upload:<sha>``, ``text:<words>`` or ``id:<point id>``.

        Raises:
            InvalidArgument: another form, or an empty value.
        """
        kind, sep, value = text.partition(":")
        if not sep or kind not in QUERY_KINDS or not value.strip():
            raise InvalidArgument(f"query {text[:80]!r} is not one of upload:<hash>, text:<words> or id:<point id>")
        return cls(kind, value if kind == "text" else value.strip())

    def __str__(self) -> str:
        return f"{self.kind}:{self.value}"


def hide_near_duplicates(hits: Sequence[Hit], threshold: float) -> tuple[list[Hit], int]:
    """Drops every hit whose cosine similarity to a better-ranked *kept* hit is at least ``threshold``.

    Greedy in rank order, so the best of a group of near-identical images stays and the others go;
    the similarity is between the stored vectors (the hits must carry them). Returns the kept hits
    and how many were hidden.
    """
    kept: list[Hit] = []
    kept_vectors: list[np.ndarray] = []
    for hit in hits:
        if hit.vector is None:
            raise ValueError("hide_near_duplicates needs the hits' vectors")
        v = hit.vector / max(float(np.linalg.norm(hit.vector)), 1e-12)
        if kept_vectors and float(np.max(np.stack(kept_vectors) @ v)) >= threshold:
            continue
        kept.append(hit)
        kept_vectors.append(v)
    return kept, len(hits) - len(kept)


class Upstream:
    """The three typed clients for one caller (one bearer token)."""

    def __init__(self, settings: WebSettings, token: str | None) -> None:
        tls = ClientTLS.from_files(settings.service_tls_ca_file, settings.service_tls_cert_file,
                                   settings.service_tls_key_file, settings.service_tls_server_name)
        retry = RetryPolicy(attempts=settings.rpc_attempts, initial=0.2, maximum=1.0)
        self.settings = settings
        self.token = token
        self.tls = tls
        self.retry = retry
        self.encoder = EncoderClient(self.endpoint(settings.encoder_address))
        self.search = SearchClient(self.endpoint(settings.search_address))
        self.evaluator = EvaluatorClient(self.endpoint(settings.evaluator_address))

    def endpoint(self, address: str, timeout: float | None = None) -> Endpoint:
        return Endpoint(address, token=self.token, tls=self.tls, timeout=timeout or self.settings.rpc_timeout_seconds,
                        retry=self.retry)

    def close(self) -> None:
        for client in (self.encoder, self.search, self.evaluator):
            client.close()


class _Connections(LRUCache[str, Upstream]):
    """Upstream connections per token; the least recently used are closed beyond the bound."""

    def popitem(self) -> tuple[str, Upstream]:
        key, upstream = super().popitem()
        upstream.close()
        return key, upstream


def _token_key(token: str | None) -> str:
    # Tokens are secrets: caches are keyed by a digest, never the token itself.
    return hashlib.sha256((token or "").encode()).hexdigest()


class Gateway:
    """Answers the page's JSON API through the encoder, search and evaluator clients.

    Every method takes the caller's bearer token (None without one), which goes on to the services.
    """

    def __init__(self, settings: WebSettings) -> None:
        self.settings = settings
        self.datasets = DatasetRoots(settings.allowed_roots, settings.datasets)
        self.reports = ReportFiles(settings.reports_dir)
        self._lock = threading.Lock()
        self._connections = _Connections(maxsize=settings.max_clients)
        self._queries: TTLCache[tuple[str, str], np.ndarray] = TTLCache(
            maxsize=max(1, settings.query_cache_size), ttl=settings.query_cache_seconds)
        # Pages of one search come from one answer (lazy loading asks for the next page while scrolling).
        self._results: TTLCache[tuple[Any, ...], tuple[list[Hit], int, bool]] = TTLCache(maxsize=256, ttl=120)
        self._infos: TTLCache[tuple[str, str], search_pb2.CollectionInfo] = TTLCache(maxsize=256, ttl=10)
        self._labels: TTLCache[tuple[str, str, int], Labels] = TTLCache(maxsize=64, ttl=300)
        self._health_pool = ThreadPoolExecutor(max_workers=3, thread_name_prefix="health")

    def close(self) -> None:
        with self._lock:
            for upstream in self._connections.values():
                upstream.close()
            self._connections.clear()
        self._health_pool.shutdown(wait=False)

    def upstream(self, token: str | None) -> Upstream:
        """The connections of ``token``'s caller (made on first use)."""
        key = _token_key(token)
        with self._lock:
            found = self._connections.get(key)
            if found is None:
                found = Upstream(self.settings, token)
                self._connections[key] = found
            return found

    # -- services ---------------------------------------------------------------------------------

    def health(self, token: str | None) -> list[ServiceHealth]:
        """Whether each service reports SERVING (health checks need no token), checked in parallel."""
        up = self.upstream(token)

        def check(name: str, client: EncoderClient | SearchClient | EvaluatorClient) -> ServiceHealth:
            try:
                client.wait_ready(timeout=1.5)
                return ServiceHealth(name=name, address=client.endpoint.address, serving=True, message="")
            except Unavailable:
                consequence = WHAT_STILL_WORKS[f"{name} service"]
                return ServiceHealth(name=name, address=client.endpoint.address, serving=False,
                                     message=f"The {name} service ({client.endpoint.address}) is not reachable: "
                                             f"{consequence}.")

        futures = [self._health_pool.submit(check, name, client) for name, client in
                   (("encoder", up.encoder), ("search", up.search), ("evaluator", up.evaluator))]
        return [f.result() for f in futures]

    def models(self, token: str | None) -> list[ModelView]:
        """The encoder's models, with whether each takes text queries (and why not)."""
        return [_model_view(m) for m in self.upstream(token).encoder.models()]

    def collections(self, token: str | None) -> list[CollectionView]:
        """The search service's collections, with whether this gateway serves their images."""
        served = self.datasets.roots()
        return [CollectionView(name=c.name, dim=c.dim, model=c.model, dataset=c.dataset, count=c.points_count,
                               status=_INDEX_STATUS.get(c.status, "unknown"), browsable=c.dataset in served)
                for c in sorted(self.upstream(token).search.collections(), key=lambda c: c.name)]

    def _collection(self, token: str | None, name: str) -> search_pb2.CollectionInfo:
        key = (_token_key(token), name)
        info = self._infos.get(key)
        if info is None:
            info = self.upstream(token).search.collection(name)
            self._infos[key] = info
        return info

    def labels(self, token: str | None, collection: str) -> Labels:
        """The labels used in ``collection`` (for the label filter), read once per size of the collection."""
        info = self._collection(token, collection)
        key = (_token_key(token), collection, int(info.points_count))
        found = self._labels.get(key)
        if found is None:
            seen: set[str] = set()
            points = self.upstream(token).search.scroll(collection, page=256)
            read = 0
            for point in itertools.islice(points, self.settings.max_label_scan):
                seen.update(point.payload.labels)
                read += 1
            found = Labels(collection=collection, labels=sorted(seen), complete=read < self.settings.max_label_scan
                           or read >= info.points_count)
            self._labels[key] = found
        return found

    # -- search -----------------------------------------------------------------------------------

    def _model_for(self, info: search_pb2.CollectionInfo, model: str) -> str:
        """The model a query of this collection is embedded with: the collection's own."""
        if info.model and model and model != info.model:
            raise InvalidArgument(f"collection {info.name!r} holds {info.model} vectors; search it with {info.model}, "
                                  f"not {model}")
        chosen = info.model or model
        if not chosen:
            raise InvalidArgument(f"collection {info.name!r} does not say which model made its vectors; choose one")
        return chosen

    def check_upload(self, data: bytes) -> None:
        """Refuses an upload over the byte or pixel limits, or that is no image, before the encoder sees it.

        Only the image's header is read here (its size); decoding is the encoder's work.
        """
        from PIL import Image, UnidentifiedImageError

        limit = self.settings.max_upload_bytes
        if len(data) > limit:
            raise ResourceExhausted(f"The image is {len(data) / 1e6:.1f} MB; the largest upload is "
                                    f"{limit / 1e6:.1f} MB.")
        if not data:
            raise InvalidArgument("The file is empty.")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(data)) as img:
                    width, height = img.size
        except Image.DecompressionBombError:
            raise ResourceExhausted(f"The image has too many pixels; the largest upload is "
                                    f"{self.settings.max_upload_pixels / 1e6:.0f} megapixels.") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            raise InvalidArgument("This file is not an image the platform can read: upload a JPEG, PNG, WebP, GIF, "
                                  "TIFF or BMP file.") from None
        if width * height > self.settings.max_upload_pixels:
            raise ResourceExhausted(f"The image is {width} x {height} pixels ({width * height / 1e6:.1f} megapixels); "
                                    f"the largest upload is {self.settings.max_upload_pixels / 1e6:.0f} megapixels.")

    def remember_upload(self, token: str | None, collection: str, model: str, data: bytes) -> Query:
        """Embeds an uploaded image with the collection's model and remembers its vector by content hash."""
        self.check_upload(data)
        model_id = self._model_for(self._collection(token, collection), model)
        digest = hashlib.sha256(data).hexdigest()[:32]
        if (model_id, digest) not in self._queries:
            embedded = self.upstream(token).encoder.embed_images([data], model=model_id)
            if 0 in embedded.errors:
                error = embedded.errors[0]
                raise error_for(error.code, f"The encoder could not use this image: {error.message}")
            self._queries[(model_id, digest)] = embedded.vectors[0]
        return Query("upload", digest)

    def _vector(self, token: str | None, query: Query, model: str) -> np.ndarray:
        if query.kind == "upload":
            vector = self._queries.get((model, query.value))
            if vector is None:
                raise NotFound("This uploaded image is no longer remembered by the gateway (it keeps the last "
                               f"{self.settings.query_cache_size} for {self.settings.query_cache_seconds / 3600:g} h, "
                               "in memory): upload it again.")
            return vector
        text = query.value
        if len(text) > self.settings.max_text_chars:
            raise InvalidArgument(f"The text has {len(text)} characters; at most {self.settings.max_text_chars}.")
        info = self.upstream(token).encoder.model(model)
        view = _model_view(info)
        if not view.text:
            raise InvalidArgument(view.text_reason)
        embedded = self.upstream(token).encoder.embed_texts([text], model=model)
        if 0 in embedded.errors:
            error = embedded.errors[0]
            raise error_for(error.code, f"The encoder could not use this text: {error.message}")
        return embedded.vectors[0]

    def search(self, token: str | None, collection: str, model: str, query: Query, k: int,
               labels: Sequence[str] = (), duplicates: float | None = None, offset: int = 0,
               limit: int = 24) -> SearchPage:
        """One page of the top-``k`` results of ``query`` in ``collection``.

        Args:
            token: the caller's bearer token.
            collection: where to search.
            model: the model that embeds the query ('' or the collection's own).
            query: an uploaded image's hash, a text, or a stored point's id ("search with this").
            k: results in all (at most ``max_k``).
            labels: keep only results with at least one of these labels.
            duplicates: hide results at or above this cosine similarity to a better-ranked shown one.
            offset, limit: the page of the results to return.
        """
        if not 1 <= k <= self.settings.max_k:
            raise InvalidArgument(f"k must be between 1 and {self.settings.max_k}, not {k}.")
        info = self._collection(token, collection)
        model_id = info.model if query.kind == "id" and info.model else self._model_for(info, model)
        labels = tuple(sorted({label.strip() for label in labels if label.strip()}))
        key = (_token_key(token), collection, model_id, str(query), k, labels, duplicates)
        found = self._results.get(key)
        if found is None:
            search = self.upstream(token).search
            flt = SearchFilter(labels_any=labels) if labels else None
            exact = info.points_count <= self.settings.exact_search_max_points
            with_vector = duplicates is not None
            if query.kind == "id":
                hits = search.search_by_id(collection, query.value, k, flt, exact=exact, with_vector=with_vector)
            else:
                vector = self._vector(token, query, model_id)
                hits = search.search(collection, vector, k, flt, exact=exact, with_vector=with_vector)
            hidden = 0
            if duplicates is not None:
                hits, hidden = hide_near_duplicates(hits, duplicates)
            found = (hits, hidden, exact)
            self._results[key] = found
        hits, hidden, exact = found
        served = self.datasets.roots()
        page = [HitView(rank=offset + i + 1, id=h.id, score=round(float(h.score), 6), dataset=h.dataset, path=h.path,
                        labels=list(h.labels),
                        image=(f"/api/images/{quote(h.dataset, safe='')}/{quote(h.path)}"
                               if h.dataset in served else ""))
                for i, h in enumerate(hits[offset:offset + limit])]
        return SearchPage(collection=collection, model=model_id, query=str(query), k=k, total=len(hits), offset=offset,
                          hits=page, hidden_duplicates=hidden, exact=exact)

    # -- runs -------------------------------------------------------------------------------------

    def runs(self, token: str | None, limit: int = 50) -> list[RunView]:
        """The evaluator's latest runs, newest first."""
        return [self.run_view(r) for r in itertools.islice(self.upstream(token).evaluator.runs(page_size=limit), limit)]

    def run(self, token: str | None, run_id: str) -> RunView:
        return self.run_view(self.upstream(token).evaluator.run(run_id))

    def cancel(self, token: str | None, run_id: str) -> RunView:
        return self.run_view(self.upstream(token).evaluator.cancel(run_id))

    def start_run(self, token: str | None, request: StartRun) -> str:
        """Starts a run on a dataset this gateway knows by name (a client never names a server path)."""
        root = self.datasets.root(request.dataset)
        spec = evaluator_pb2.RunSpec(dataset=str(root), models=list(request.models),
                                     protocol=_PROTOCOLS[request.protocol], catalogue=request.catalogue,
                                     queries=request.queries, run_name=request.run_name, tsne=request.tsne,
                                     dataset_name=request.dataset if root.name != request.dataset else "")
        return self.upstream(token).evaluator.start_run(spec)

    def watcher(self, token: str | None) -> EvaluatorClient:
        """A client of its own for one progress stream: closing it ends a watch blocked on the evaluator."""
        up = self.upstream(token)
        # The stream lasts as long as the run: the deadline of one call does not apply.
        return EvaluatorClient(up.endpoint(self.settings.evaluator_address, timeout=24 * 3600.0))

    def run_view(self, run: evaluator_pb2.Run) -> RunView:
        spec = run.spec
        name = spec.dataset_name or _dataset_name(spec.dataset)
        reports = []
        for path in run.reports:
            rel = self.reports.relative(path)
            reports.append(ReportLink(path=rel or "", url=f"/reports/{quote(rel)}" if rel else ""))
        return RunView(
            id=run.id, dataset=name, models=list(spec.models),
            protocol=spec.protocol_name or _PROTOCOL_NAMES.get(spec.protocol, "leave_one_out"), run_name=spec.run_name,
            state=_RUN_STATES.get(run.state, "unknown"), stage=run.progress.stage,
            done=int(run.progress.done), total=int(run.progress.total), message=run.progress.message,
            created=run.created.ToNanoseconds() / 1e9 if run.HasField("created") else None,
            finished=run.finished.ToNanoseconds() / 1e9 if run.HasField("finished") else None,
            metrics=dict(run.metrics), reports=reports, error=run.error)

    def watch(self, client: EvaluatorClient, run_id: str) -> Iterator[RunView]:
        """The run now and after every change until it ends (``client`` from ``watcher``)."""
        for run in client.watch(run_id):
            yield self.run_view(run)


def _dataset_name(path: str) -> str:
    parts = [p for p in path.replace("\\", "/").split("/") if p]
    if parts and "." in parts[-1] and len(parts) > 1:  # a list file: its folder names the dataset
        return parts[-2]
    return parts[-1] if parts else path


def _model_view(info: encoder_pb2.ModelInfo) -> ModelView:
    text = common_pb2.MODALITY_TEXT in info.modalities
    return ModelView(id=info.id, dim=info.dim, text=text, loaded=info.loaded, max_text_chars=info.max_text_chars,
                     text_reason="" if text else f"{info.id} has no text tower: search this collection with an image.")

