"""The evaluator's view of the other two services: thin clients over their gRPC stubs."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from retrieval.v1 import encoder_pb2, encoder_pb2_grpc, search_pb2, search_pb2_grpc

from services.common.client import channel, wait_serving
from services.common.errors import Unavailable

Progress = Callable[[int, int], None]
"""Called with (items done, items in total)."""


@dataclass(frozen=True)
class Embedded:
    """Vectors of the images that embedded, and why the others did not.

    Attributes:
        ok: boolean mask over the requested paths.
        vectors: float32 (ok.sum(), dim), L2-normalised, in request order.
        failed: request index -> error message.
    """

    ok: np.ndarray
    vectors: np.ndarray
    failed: dict[int, str]


class _ServiceClient:
    """A channel to one of the platform's services (bearer token when given) and its health."""

    service = ""

    def __init__(self, address: str, timeout: float = 600.0, token: str | None = None) -> None:
        self.address = address
        self.timeout = timeout
        self._channel = channel(address, token=token)

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Blocks until the service reports SERVING; Unavailable (retryable) otherwise."""
        try:
            wait_serving(self._channel, self.service, timeout=timeout)
        except TimeoutError as exc:
            raise Unavailable(f"{self.service} at {self.address} is not serving: {exc}") from exc

    def close(self) -> None:
        self._channel.close()


class EncoderClient(_ServiceClient):
    """Embeds image files through ``retrieval.v1.EncoderService``."""

    service = "retrieval.v1.EncoderService"

    def __init__(self, address: str, timeout: float = 600.0, token: str | None = None) -> None:
        super().__init__(address, timeout, token)
        self._stub = encoder_pb2_grpc.EncoderServiceStub(self._channel)

    def model(self, model_id: str) -> encoder_pb2.ModelInfo:
        return self._stub.GetModel(encoder_pb2.GetModelRequest(model=model_id), timeout=self.timeout).model

    def embed_files(self, model_id: str, root: Path, paths: Sequence[str], batch: int = 32,
                    progress: Progress | None = None, cancelled: threading.Event | None = None) -> Embedded:
        """Streams the files (read lazily) in messages of ``batch`` images; the server pipelines them."""
        def requests() -> Iterator[encoder_pb2.StreamEmbedImagesRequest]:
            for start in range(0, len(paths), batch):
                if cancelled is not None and cancelled.is_set():
                    return
                images = []
                for i in range(start, min(start + batch, len(paths))):
                    try:
                        data = (root / paths[i]).read_bytes()
                    except OSError:
                        data = b""  # reported by the encoder as an empty image, with its index
                    images.append(encoder_pb2.Image(data=data, id=str(i)))
                yield encoder_pb2.StreamEmbedImagesRequest(model=model_id, images=images)

        ok = np.zeros(len(paths), dtype=bool)
        rows: list[np.ndarray] = []
        failed: dict[int, str] = {}
        done = 0
        for response in self._stub.StreamEmbedImages(requests(), timeout=self.timeout * max(1, len(paths) // 1000)):
            for result in response.results:
                index = int(result.id)
                if result.WhichOneof("result") == "vector":
                    ok[index] = True
                    rows.append(np.asarray(result.vector.values, dtype=np.float32))
                else:
                    failed[index] = f"{paths[index]}: {result.error.message}"
            done += len(response.results)
            if progress is not None:
                progress(done, len(paths))
        dim = rows[0].shape[0] if rows else 0
        vectors = np.stack(rows) if rows else np.zeros((0, dim), dtype=np.float32)
        return Embedded(ok=ok, vectors=vectors, failed=failed)


@dataclass(frozen=True)
class Hit:
    id: str
    score: float


class SearchClient(_ServiceClient):
    """Indexes and queries through ``retrieval.v1.SearchService``."""

    service = "retrieval.v1.SearchService"

    def __init__(self, address: str, timeout: float = 600.0, token: str | None = None) -> None:
        super().__init__(address, timeout, token)
        self._stub = search_pb2_grpc.SearchServiceStub(self._channel)

    def recreate_collection(self, name: str, dim: int, model: str, dataset: str) -> None:
        """A fresh, empty collection (an earlier one of the same name is dropped)."""
        try:
            self._stub.DeleteCollection(search_pb2.DeleteCollectionRequest(name=name), timeout=self.timeout)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
        self._stub.CreateCollection(search_pb2.CreateCollectionRequest(name=name, dim=dim, model=model,
                                                                       dataset=dataset), timeout=self.timeout)

    def upsert(self, collection: str, dataset: str, paths: Sequence[str], labels: Sequence[Sequence[str]],
               vectors: np.ndarray, batch: int = 256, progress: Progress | None = None) -> list[str]:
        """Stores the vectors with their payloads; returns the point ids (derived from dataset + path)."""
        def requests() -> Iterator[search_pb2.UpsertRequest]:
            for start in range(0, len(paths), batch):
                points = [search_pb2.Point(vector=vectors[i].tolist(), payload=search_pb2.Payload(
                    dataset=dataset, path=paths[i], labels=list(labels[i])))
                    for i in range(start, min(start + batch, len(paths)))]
                yield search_pb2.UpsertRequest(collection=collection, points=points)
                if progress is not None:
                    progress(min(start + batch, len(paths)), len(paths))

        response = self._stub.Upsert(requests(), timeout=self.timeout)
        return list(response.ids)

    def search_by_ids(self, collection: str, ids: Sequence[str], limit: int, exact: bool = True,
                      concurrency: int = 8, progress: Progress | None = None) -> list[list[Hit]]:
        """Top-``limit`` neighbours of each stored point (itself excluded), ``concurrency`` calls in flight."""
        results: list[list[Hit] | None] = [None] * len(ids)
        slots = threading.Semaphore(concurrency)
        errors: list[BaseException] = []
        done = [0]
        lock = threading.Lock()

        def finished(index: int, fut: Future[search_pb2.SearchResponse]) -> None:
            try:
                results[index] = [Hit(h.id, h.score) for h in fut.result().hits]
            except BaseException as exc:
                errors.append(exc)
            finally:
                slots.release()
                with lock:
                    done[0] += 1
                    if progress is not None and (done[0] % 256 == 0 or done[0] == len(ids)):
                        progress(done[0], len(ids))

        for index, point_id in enumerate(ids):
            slots.acquire()
            if errors:
                slots.release()
                break
            request = search_pb2.SearchByIdRequest(collection=collection, id=point_id, limit=limit, exact=exact)
            fut = self._stub.SearchById.future(request, timeout=self.timeout)
            fut.add_done_callback(lambda f, i=index: finished(i, f))
        for _ in range(concurrency):
            slots.acquire()
        if errors:
            raise errors[0]
        return [r if r is not None else [] for r in results]

    def search_vectors(self, collection: str, vectors: np.ndarray, limit: int, exact: bool = True,
                       batch: int = 64, progress: Progress | None = None) -> list[list[Hit]]:
        """Top-``limit`` catalogue points for each query vector, ``batch`` queries per SearchBatch."""
        out: list[list[Hit]] = []
        for start in range(0, len(vectors), batch):
            queries = [search_pb2.SearchRequest(collection=collection, vector=v.tolist(), limit=limit, exact=exact)
                       for v in vectors[start:start + batch]]
            response = self._stub.SearchBatch(search_pb2.SearchBatchRequest(queries=queries), timeout=self.timeout)
            out += [[Hit(h.id, h.score) for h in r.hits] for r in response.results]
            if progress is not None:
                progress(len(out), len(vectors))
        return out
