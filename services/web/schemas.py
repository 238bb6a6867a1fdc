"""The gateway's JSON: request and response bodies (FastAPI publishes them in its OpenAPI schema)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    """Every error: a sentence for the person, and the gRPC-style code for scripts."""

    error: str = Field(description="what went wrong, as a sentence")
    code: str = Field(description="INVALID_ARGUMENT, NOT_FOUND, UNAVAILABLE, UNAUTHENTICATED, ...")


class ServiceHealth(BaseModel):
    name: str = Field(description="encoder, search or evaluator")
    address: str
    serving: bool
    message: str = Field("", description="why it is not serving, and what still works")


class Health(BaseModel):
    services: list[ServiceHealth]
    auth_required: bool = Field(description="whether this gateway needs a bearer token")
    max_upload_bytes: int
    max_upload_pixels: int
    max_k: int


class ModelView(BaseModel):
    id: str
    dim: int
    text: bool = Field(description="whether the model has a text tower (text queries)")
    text_reason: str = Field("", description="why text queries are off for this model")
    loaded: bool
    max_text_chars: int


class CollectionView(BaseModel):
    name: str
    dim: int
    model: str = Field(description="the encoder model whose vectors the collection holds")
    dataset: str
    count: int
    status: str
    browsable: bool = Field(description="whether this gateway serves the dataset's images")


class Labels(BaseModel):
    collection: str
    labels: list[str]
    complete: bool = Field(description="false when the collection was larger than the gateway reads for labels")


class HitView(BaseModel):
    rank: int = Field(description="1-based position among the results shown")
    id: str = Field(description="point id: query with it for 'search with this'")
    score: float = Field(description="cosine similarity to the query")
    dataset: str
    path: str
    labels: list[str]
    image: str = Field(description="URL of the image on this gateway; empty when its dataset is not served")


class SearchPage(BaseModel):
    collection: str
    model: str
    query: str = Field(description="the query as the URL keeps it: upload:<sha>, text:<words> or id:<point id>")
    k: int
    total: int = Field(description="results in all (after hiding near-duplicates)")
    offset: int
    hits: list[HitView]
    hidden_duplicates: int = Field(description="results hidden as near-duplicates of better-ranked ones")
    exact: bool = Field(description="whether the search was exact (else the HNSW index)")


class DatasetView(BaseModel):
    name: str


class ReportLink(BaseModel):
    path: str = Field(description="the report's path relative to the report directory ('' when outside it)")
    url: str = Field(description="where this gateway serves it ('' when it does not)")


class RunView(BaseModel):
    id: str
    dataset: str
    models: list[str]
    protocol: str
    run_name: str
    state: str = Field(description="queued, running, succeeded, failed or cancelled")
    stage: str
    done: int
    total: int
    message: str
    created: float | None = Field(description="Unix seconds")
    finished: float | None
    metrics: dict[str, float]
    reports: list[ReportLink]
    error: str


class StartRun(BaseModel):
    dataset: str = Field(description="a dataset name from /api/datasets")
    models: list[str] = Field(min_length=1, max_length=8)
    protocol: Literal["leave_one_out", "catalogue_query"] = "leave_one_out"
    catalogue: str = Field("", max_length=200, description="catalogue list (catalogue_query), in the dataset")
    queries: str = Field("", max_length=200, description="query list (catalogue_query), in the dataset")
    run_name: str = Field("", max_length=64, description="the run's report folder name")
    tsne: bool = Field(False, description="draw the t-SNE maps (seconds to a minute per model)")


class StartedRun(BaseModel):
    run_id: str


class Summary(BaseModel):
    path: str
    url: str
    modified: float
