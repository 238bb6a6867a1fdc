"""Names every service and client agree on: point ids and collection names.

They live in ``common`` so that the search service derives the same id a client computes, without
either importing the other.
"""

from __future__ import annotations

import re
import uuid

# Fixed forever: changing it changes every point id (and so re-indexing would duplicate points).
POINT_ID_NAMESPACE = uuid.UUID("6f1c2a56-3d3e-5b8e-9a51-1c8d3c0e7a21")

_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


def point_id(dataset: str, path: str) -> str:
    """The id of the point for image ``path`` of ``dataset``: UUIDv5 of ``dataset + NUL + path``.

    Deterministic, so re-sending an upsert overwrites the same points (idempotent ingest). NUL
    cannot occur in a path or (validated) dataset name, so distinct pairs never collide by
    concatenation. Any client can compute it: ``uuid5(POINT_ID_NAMESPACE, f"{dataset}\\0{path}")``.
    """
    return str(uuid.uuid5(POINT_ID_NAMESPACE, f"{dataset}\0{path}"))


def collection_name(dataset: str, model: str) -> str:
    """The conventional collection of ``model``'s vectors of ``dataset``: ``<dataset>__<model>``.

    Characters other than letters, digits, ``.``, ``_`` and ``-`` become ``-`` (model ids such as
    ``openclip:ViT-B-32/laion2b`` contain ``:`` and ``/``).
    """
    return f"{_NAME_CHARS.sub('-', dataset)}__{_NAME_CHARS.sub('-', model)}"
