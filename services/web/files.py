"""What the gateway serves from disk: dataset images under the allowed roots, and the report directory.

Nothing else is ever served. A requested path is a client's string: it is checked (relative, no
``..``, no hidden parts, a served file type) and then resolved with its symlinks and checked again to
lie inside its dataset's root (``services.common.paths.resolve_allowed``), so neither ``..``, an
absolute path, an encoded slash nor a symlink leaving the root reaches another file.
"""

from __future__ import annotations

import logging
import os
import posixpath
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from services.common.errors import InvalidArgument, NotFound
from services.common.paths import resolve_allowed

log = logging.getLogger(__name__)

LIST_FILE = "list_of_images.txt"
IMAGE_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".gif": "image/gif",
               ".webp": "image/webp", ".bmp": "image/bmp", ".tif": "image/tiff", ".tiff": "image/tiff",
               ".ppm": "image/x-portable-pixmap", ".pgm": "image/x-portable-graymap"}
REPORT_TYPES = {".html": "text/html; charset=utf-8", ".md": "text/markdown; charset=utf-8",
                ".json": "application/json", ".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
                ".txt": "text/plain; charset=utf-8", ".tsv": "text/tab-separated-values; charset=utf-8",
                ".csv": "text/csv; charset=utf-8"}
_DISCOVERY_SECONDS = 30.0  # datasets written while the gateway runs appear within this
_MAX_SCANNED_DIRS = 5000  # discovery never walks a huge tree
_MAX_SUMMARIES = 200


def relative_path(raw: str, what: str, types: dict[str, str]) -> str:
    """A client's relative path, normalised; refused when absolute, leaving its root, hidden or not served.

    Raises:
        InvalidArgument: the path is not one the gateway serves (the message says why).
    """
    if not raw or "\0" in raw or "\\" in raw:
        raise InvalidArgument(f"{what} {raw!r} is not a valid relative path")
    if posixpath.isabs(raw) or os.path.isabs(raw):
        raise InvalidArgument(f"{what} {raw!r} is absolute; only paths inside the served folder are served")
    parts = raw.split("/")
    if any(part in ("..", ".") for part in parts):
        raise InvalidArgument(f"{what} {raw!r} leaves the served folder")
    if any(part.startswith(".") for part in parts if part):
        raise InvalidArgument(f"{what} {raw!r} names a hidden file or folder, which is never served")
    norm = posixpath.normpath(raw)
    if Path(norm).suffix.lower() not in types:
        raise InvalidArgument(f"{what} {raw!r} is not a served file type ({', '.join(sorted(types))})")
    return norm


def _inside(path: Path, root: Path, what: str) -> Path:
    """``root / path`` with symlinks resolved, if it is a regular file inside ``root``."""
    resolved = resolve_allowed(root / path, [root], what=what)
    if not resolved.is_file():
        raise NotFound(f"{what} {str(path)!r} is not a file")
    return resolved


@dataclass(frozen=True)
class ServedFile:
    """A file the gateway may send: its resolved path and media type."""

    path: Path
    media_type: str


def _served(resolved: Path, raw: str, what: str, types: dict[str, str]) -> ServedFile:
    """The file with its media type; a symlink to a file of a type not served is refused."""
    media_type = types.get(resolved.suffix.lower())
    if media_type is None:
        raise InvalidArgument(f"{what} {raw!r} is not a served file type")
    return ServedFile(resolved, media_type)


class DatasetRoots:
    """Dataset names (the points' payload ``dataset``) to their root folders under the allowed roots.

    Known: the ``explicit`` NAME=PATH entries; every allowed root, by its folder's name; and every
    folder holding a ``list_of_images.txt`` up to two levels below an allowed root (re-scanned every
    ``_DISCOVERY_SECONDS``). An explicit entry outside the allowed roots is refused at start.
    """

    def __init__(self, allowed_roots: Sequence[Path], explicit: Sequence[str] = ()) -> None:
        self.allowed_roots = [Path(r).resolve() for r in allowed_roots]
        self._explicit: dict[str, Path] = {}
        for entry in explicit:
            name, _, path = entry.partition("=")
            self._explicit[name.strip()] = resolve_allowed(path.strip(), self.allowed_roots, what="dataset path")
        self._lock = threading.Lock()
        self._found: dict[str, Path] = {}
        self._scanned = -_DISCOVERY_SECONDS

    def _discover(self) -> dict[str, Path]:
        found: dict[str, Path] = {}
        scanned = 0

        def add(name: str, root: Path) -> None:
            if name in found and found[name] != root:
                log.warning("dataset name %r is used by %s and %s; serving the first", name, found[name], root)
                return
            found.setdefault(name, root)

        for root in self.allowed_roots:
            if root.is_dir():
                add(root.name, root)
            level = [root]
            for _ in range(2):
                below: list[Path] = []
                for folder in level:
                    try:
                        with os.scandir(folder) as entries:
                            for entry in entries:
                                if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
                                    continue
                                scanned += 1
                                if scanned > _MAX_SCANNED_DIRS:
                                    return found
                                child = Path(entry.path)
                                if (child / LIST_FILE).is_file():
                                    add(entry.name, child)
                                below.append(child)
                    except OSError:
                        continue
                level = below
        return found

    def roots(self) -> dict[str, Path]:
        """Every known dataset name and its resolved root."""
        with self._lock:
            if time.monotonic() - self._scanned > _DISCOVERY_SECONDS:
                self._found = self._discover()
                self._scanned = time.monotonic()
            return {**self._found, **self._explicit}

    def root(self, dataset: str) -> Path:
        """The root of dataset ``dataset``.

        Raises:
            NotFound: no dataset of that name is served here.
        """
        root = self.roots().get(dataset)
        if root is None:
            raise NotFound(f"no dataset named {dataset!r} is served here (its folder is not under the allowed "
                           "roots, or it needs a WEB_DATASETS entry)")
        return root

    def image(self, dataset: str, path: str) -> ServedFile:
        """The image ``path`` of ``dataset``, if it is an image file inside that dataset's root.

        Raises:
            InvalidArgument: the path is absolute, leaves the root (``..``, a symlink), is hidden or not an image.
            NotFound: unknown dataset, or no such file.
        """
        rel = relative_path(path, "image", IMAGE_TYPES)
        return _served(_inside(Path(rel), self.root(dataset), "image"), path, "image", IMAGE_TYPES)


class ReportFiles:
    """The evaluator's report directory, read-only: summaries, run reports and their figures."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def file(self, path: str) -> ServedFile:
        """The report file ``path`` (relative to the report directory).

        Raises:
            InvalidArgument: the path is absolute, leaves the directory, is hidden or not a report type.
            NotFound: no such file.
        """
        rel = relative_path(path, "report file", REPORT_TYPES)
        if not self.directory.is_dir():
            raise NotFound(f"the report directory {str(self.directory)!r} does not exist yet (no run has written "
                           "a report)")
        return _served(_inside(Path(rel), self.directory.resolve(), "report file"), path, "report file",
                       REPORT_TYPES)

    def relative(self, path: str) -> str | None:
        """``path`` (as the evaluator reports it) relative to the report directory; None when outside it."""
        try:
            rel = Path(path).resolve().relative_to(self.directory.resolve())
        except (ValueError, OSError):
            return None
        return rel.as_posix()

    def summaries(self) -> list[tuple[str, float]]:
        """The aggregated reports (``summary.html``), newest first, as (relative path, modified time)."""
        if not self.directory.is_dir():
            return []
        found: list[tuple[str, float]] = []
        for path in self.directory.rglob("summary.html"):
            rel = path.relative_to(self.directory)
            if any(part.startswith(".") for part in rel.parts):
                continue
            found.append((rel.as_posix(), path.stat().st_mtime))
            if len(found) >= _MAX_SUMMARIES:
                break
        return sorted(found, key=lambda s: -s[1])
