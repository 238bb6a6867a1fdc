"""Dataset readers (DESIGN §4): image lists, folder per class, catalogue/query splits, fingerprints.

Only paths and labels are read here (plus file metadata for the checks and the fingerprint); the
caller reads the encoded image bytes. Every dataset comes from an allowed root, and no listed path
may leave its dataset's root.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import stat
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from services.common.errors import InvalidArgument, NotFound
from services.common.paths import resolve_allowed

LIST_FILE = "list_of_images.txt"
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
_FINGERPRINT_VERSION = b"retrieval-dataset-fingerprint/v1\n"


@dataclass(frozen=True)
class Item:
    """One image of a dataset.

    Attributes:
        path: normalised POSIX path relative to the dataset root (never absolute, never ``..``).
        labels: the image's classes, sorted and unique; several make a multi-label image; none
            make a distractor (relevant to no query).
        junk: classes for whose queries this image is junk (revisitop): removed from those
            queries' rankings, neither relevant nor irrelevant. Sorted and unique.
    """

    path: str
    labels: tuple[str, ...]
    junk: tuple[str, ...] = ()


@dataclass(frozen=True)
class Dataset:
    """A labelled image set: items under one root directory.

    Attributes:
        name: display name (by default the root folder's name).
        root: absolute, resolved root directory; item paths are relative to it.
        items: the images, in the order of the list (or sorted, for folders).
    """

    name: str
    root: Path
    items: tuple[Item, ...]

    def __len__(self) -> int:
        return len(self.items)

    @property
    def classes(self) -> list[str]:
        """Sorted class names used by the items."""
        return sorted({label for item in self.items for label in item.labels})

    @property
    def labels(self) -> list[tuple[str, ...]]:
        """Labels of every item, in item order (the input of ``metrics.encode_labels``)."""
        return [item.labels for item in self.items]

    def path_of(self, item: Item) -> Path:
        """Absolute path of an item's image file."""
        return self.root / item.path

    def without(self, paths: Iterable[str]) -> Dataset:
        """The same dataset without the items at ``paths`` (e.g. images the encoder could not decode)."""
        drop = set(paths)
        return Dataset(self.name, self.root, tuple(item for item in self.items if item.path not in drop))


@dataclass(frozen=True)
class Split:
    """A catalogue/query split: queries are ranked against the catalogue only.

    Attributes:
        name: display name.
        catalogue: the searched images (``train``).
        queries: the query images (``test``); no path is in both.
    """

    name: str
    catalogue: Dataset
    queries: Dataset


@dataclass(frozen=True)
class Unreadable:
    """An image excluded from a run, and why."""

    path: str
    reason: str


@dataclass(frozen=True)
class CheckedDataset:
    """The outcome of ``check_images``.

    Attributes:
        dataset: the readable items only; runs use this.
        unreadable: the excluded items with the reason, in item order.
        fingerprint: ``fingerprint`` of the dataset as listed (readable or not).
    """

    dataset: Dataset
    unreadable: tuple[Unreadable, ...]
    fingerprint: str

    @property
    def n_excluded(self) -> int:
        """How many listed images were excluded."""
        return len(self.unreadable)


def _relative(raw: str, where: str) -> str:
    """A listed path, normalised; absolute paths and paths leaving the root are errors."""
    if not raw:
        raise InvalidArgument(f"{where}: empty image path")
    if "\0" in raw:
        raise InvalidArgument(f"{where}: image path contains a NUL byte")
    if posixpath.isabs(raw) or os.path.isabs(raw):
        raise InvalidArgument(f"{where}: image path {raw!r} is absolute; paths must be relative to the dataset root")
    norm = posixpath.normpath(raw)
    if norm == ".." or norm.startswith("../") or norm == ".":
        raise InvalidArgument(f"{where}: image path {raw!r} leaves the dataset root")
    return norm


def _names(field: str, where: str) -> tuple[str, ...]:
    names = [name.strip() for name in field.split(",")]
    if not all(names):
        raise InvalidArgument(f"{where}: empty class name in {field!r}")
    return tuple(sorted(set(names)))


def _parse_list(list_file: Path, *, labelled: bool) -> list[tuple[str, tuple[str, ...] | None, str, tuple[str, ...]]]:
    """Lines of an image list as (path, labels or None, "file:line", junk classes); blank lines
    are skipped.

    With ``labelled``, every line is ``path<TAB>class[,class...]``, optionally followed by
    ``<TAB>junk:class[,class...]`` (the classes for whose queries the image is junk; with it the
    class column may be empty: a distractor); otherwise the class column is optional (split lists
    that name images of a labelled list).
    """
    try:
        text = list_file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"{list_file}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise NotFound(f"{list_file}: cannot read the image list ({exc.strerror})") from exc
    out: list[tuple[str, tuple[str, ...] | None, str, tuple[str, ...]]] = []
    first_line: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{list_file}:{number}"
        fields = line.split("\t")
        junk: tuple[str, ...] = ()
        if len(fields) == 3 and fields[2].startswith("junk:"):
            junk = _names(fields[2][len("junk:"):], where)
            fields = fields[:2]
        if len(fields) > 2 or (labelled and len(fields) != 2):
            raise InvalidArgument(f"{where}: expected 'relative/path<TAB>class[,class...][<TAB>junk:class[,...]]', "
                                  f"got {line!r}")
        path = _relative(fields[0], where)
        labels: tuple[str, ...] | None = None
        if len(fields) == 2:
            labels = () if not fields[1].strip() and junk else _names(fields[1], where)
        if path in first_line:
            raise InvalidArgument(f"{where}: {path!r} is already listed on line {first_line[path]}")
        first_line[path] = number
        out.append((path, labels, where, junk))
    return out


def read_list(
    list_file: str | os.PathLike[str],
    *,
    allowed_roots: Sequence[str | os.PathLike[str]],
    root: str | os.PathLike[str] | None = None,
    name: str | None = None,
) -> Dataset:
    """Reads a ``list_of_images.txt``: one ``relative/path<TAB>class[,class...]`` per line.

    Blank lines are ignored; comma-separated classes make a multi-label image.

    Args:
        list_file: the list.
        allowed_roots: directories datasets may come from.
        root: directory the paths are relative to (default: the list's folder).
        name: display name (default: the root folder's name).

    Raises:
        InvalidArgument: a malformed line (the message names the file and line number), a path
            that is absolute or leaves the root, a duplicate path, an empty list, or a list or
            root outside the allowed roots.
        NotFound: the list or the root does not exist.
    """
    list_path = resolve_allowed(list_file, allowed_roots)
    base = resolve_allowed(root, allowed_roots) if root is not None else list_path.parent
    entries = _parse_list(list_path, labelled=True)
    if not entries:
        raise InvalidArgument(f"{list_path}: the list has no images")
    items = tuple(Item(path, labels or (), junk) for path, labels, _, junk in entries)
    return Dataset(name or base.name, base, items)


def _image_files(folder: Path) -> list[str]:
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries
                      if not e.name.startswith(".") and e.is_file() and Path(e.name).suffix.lower() in IMAGE_EXTENSIONS)


def _class_folders(root: Path, prefix: str) -> list[Item]:
    with os.scandir(root) as entries:
        classes = sorted(e.name for e in entries if not e.name.startswith(".") and e.is_dir())
    return [Item(f"{prefix}{cls}/{file}", (cls,)) for cls in classes for file in _image_files(root / cls)]


def read_folders(
    root: str | os.PathLike[str], *, allowed_roots: Sequence[str | os.PathLike[str]], name: str | None = None
) -> Dataset:
    """Reads a folder-per-class dataset: ``root/<class>/<image>``.

    Only image files (by extension, see ``IMAGE_EXTENSIONS``) directly inside a class folder are
    read; hidden entries, files beside the class folders and deeper subfolders are ignored.

    Raises:
        InvalidArgument: no images found, or the root is outside the allowed roots.
        NotFound: the root does not exist.
    """
    base = resolve_allowed(root, allowed_roots)
    items = _class_folders(base, "")
    if not items:
        raise InvalidArgument(f"{base}: no images in root/<class>/<image> folders")
    return Dataset(name or base.name, base, tuple(items))


def _check_disjoint(catalogue: Dataset, queries: Dataset) -> None:
    shared = {item.path for item in catalogue.items} & {item.path for item in queries.items}
    if shared:
        example = sorted(shared)[0]
        raise InvalidArgument(f"{len(shared)} images are both catalogue and query, e.g. {example!r}")


def read_split_lists(
    catalogue_list: str | os.PathLike[str],
    query_list: str | os.PathLike[str],
    *,
    allowed_roots: Sequence[str | os.PathLike[str]],
    root: str | os.PathLike[str] | None = None,
    labels_list: str | os.PathLike[str] | None = None,
    name: str | None = None,
) -> Split:
    """Reads a catalogue/query split given as two image lists (e.g. ``split_train.txt``, ``split_test.txt``).

    A line is ``relative/path<TAB>class[,class...]`` or just ``relative/path``; a path without
    classes takes them from ``labels_list``.

    Args:
        catalogue_list: the catalogue's list.
        query_list: the queries' list.
        allowed_roots: directories datasets may come from.
        root: directory the paths are relative to (default: the catalogue list's folder).
        labels_list: a labelled list (default: ``root/list_of_images.txt`` when it exists).
        name: display name (default: the root folder's name).

    Raises:
        InvalidArgument: malformed lines (file and line number), a path without classes and no
            labelled entry for it, an image in both lists, paths leaving the root, empty lists.
        NotFound: a list or the root does not exist.
    """
    cat_path = resolve_allowed(catalogue_list, allowed_roots)
    query_path = resolve_allowed(query_list, allowed_roots)
    base = resolve_allowed(root, allowed_roots) if root is not None else cat_path.parent
    known = _known_labels(base, labels_list, allowed_roots)
    display = name or base.name
    split = Split(display, _side(cat_path, known, base, display), _side(query_path, known, base, display))
    _check_disjoint(split.catalogue, split.queries)
    return split


_Known = dict[str, tuple[tuple[str, ...], tuple[str, ...]]]


def _known_labels(base: Path, labels_list: str | os.PathLike[str] | None,
                  allowed_roots: Sequence[str | os.PathLike[str]]) -> _Known:
    """Labels and junk by path from a labelled list (``base/list_of_images.txt`` by default), if any."""
    if labels_list is None and not (base / LIST_FILE).is_file():
        return {}
    labelled = resolve_allowed(labels_list if labels_list is not None else base / LIST_FILE, allowed_roots)
    return {path: (labels or (), junk) for path, labels, _, junk in _parse_list(labelled, labelled=True)}


def _side(list_path: Path, known: _Known, base: Path, name: str) -> Dataset:
    items: list[Item] = []
    for path, labels, where, junk in _parse_list(list_path, labelled=False):
        if labels is None:
            if path not in known:
                raise InvalidArgument(f"{where}: {path!r} has no class here and is not in a labelled list")
            labels, junk = known[path]
        items.append(Item(path, labels, junk))
    if not items:
        raise InvalidArgument(f"{list_path}: the list has no images")
    return Dataset(name, base, tuple(items))


def read_split_side(
    list_file: str | os.PathLike[str],
    *,
    allowed_roots: Sequence[str | os.PathLike[str]],
    root: str | os.PathLike[str] | None = None,
    labels_list: str | os.PathLike[str] | None = None,
    name: str | None = None,
) -> Dataset:
    """One side of a split given as a list (e.g. the catalogue's ``split_train.txt``), read exactly as
    ``read_split_lists`` reads it (same items, labels and so fingerprint), without reading the other
    side's list: lines ``relative/path[<TAB>class[,class...]]``, classes of bare paths from
    ``labels_list`` (default ``root/list_of_images.txt``).

    Raises:
        InvalidArgument, NotFound: as ``read_split_lists``.
    """
    path = resolve_allowed(list_file, allowed_roots)
    base = resolve_allowed(root, allowed_roots) if root is not None else path.parent
    return _side(path, _known_labels(base, labels_list, allowed_roots), base, name or base.name)


def read_split_folders(
    root: str | os.PathLike[str], *, allowed_roots: Sequence[str | os.PathLike[str]], name: str | None = None
) -> Split:
    """Reads a split given as folders: ``root/train/<class>/<image>`` (catalogue) and ``root/test/...`` (queries).

    Item paths keep the ``train/`` or ``test/`` prefix, so both sides share ``root``.

    Raises:
        InvalidArgument: a missing or empty ``train`` or ``test`` folder, a root outside the allowed roots.
        NotFound: the root does not exist.
    """
    base = resolve_allowed(root, allowed_roots)
    sides: list[Dataset] = []
    for part in ("train", "test"):
        if not (base / part).is_dir():
            raise InvalidArgument(f"{base}: a folder split needs {part}/<class>/<image> folders")
        items = _class_folders(base / part, f"{part}/")
        if not items:
            raise InvalidArgument(f"{base / part}: no images in <class>/<image> folders")
        sides.append(Dataset(name or base.name, base, tuple(items)))
    return Split(name or base.name, sides[0], sides[1])


def open_dataset(
    root: str | os.PathLike[str], *, allowed_roots: Sequence[str | os.PathLike[str]], name: str | None = None
) -> Dataset:
    """The dataset in ``root``: its ``list_of_images.txt`` when there is one, else its class folders."""
    base = resolve_allowed(root, allowed_roots)
    if (base / LIST_FILE).is_file():
        return read_list(base / LIST_FILE, allowed_roots=allowed_roots, name=name)
    return read_folders(base, allowed_roots=allowed_roots, name=name)


def _usable_size(full: str, inside: Callable[[str], bool]) -> tuple[int | None, str]:
    """(size in bytes, "") for a usable image file, else (None, why not)."""
    try:
        st = os.lstat(full)
        if stat.S_ISLNK(st.st_mode):
            if not inside(os.path.realpath(full)):
                return None, "resolves outside the dataset root (symlink)"
            st = os.stat(full)
    except FileNotFoundError:
        return None, "missing"
    except OSError as exc:
        return None, f"cannot stat ({exc.strerror})"
    if not stat.S_ISREG(st.st_mode):
        return None, "not a regular file"
    if st.st_size == 0:
        return None, "empty file (0 bytes)"
    if not os.access(full, os.R_OK):
        return None, "permission denied"
    return st.st_size, ""


def _file_sizes(dataset: Dataset) -> tuple[list[int | None], list[Unreadable]]:
    """Size in bytes of each item's file (None when unusable) and the reasons for the unusable ones.

    One ``lstat`` and one ``access`` per file; symlinks are resolved per directory (cached) and per
    linked file, so that nothing outside the root is read through a link.
    """
    root = str(dataset.root)
    root_prefix = root.rstrip(os.sep) + os.sep

    def inside(real: str) -> bool:
        return real == root or real.startswith(root_prefix)

    dir_inside: dict[str, bool] = {}
    sizes: list[int | None] = []
    problems: list[Unreadable] = []
    for item in dataset.items:
        full = os.path.join(root, item.path)
        folder = os.path.dirname(full)
        if folder not in dir_inside:
            dir_inside[folder] = inside(os.path.realpath(folder))
        if dir_inside[folder]:
            size, reason = _usable_size(full, inside)
        else:
            size, reason = None, "its folder resolves outside the dataset root (symlink)"
        sizes.append(size)
        if reason:
            problems.append(Unreadable(item.path, reason))
    return sizes, problems


def fingerprint(dataset: Dataset, sizes: Sequence[int | None] | None = None) -> str:
    """SHA-256 (hex) identifying a dataset's content for caching embeddings and runs.

    It covers exactly, for every item sorted by path, the line ``path<TAB>labels<TAB>size<LF>``
    (UTF-8): the normalised relative path, the sorted labels joined by commas, and the file size in
    bytes, or ``missing`` for a file that cannot be used (see ``check_images``), after a version
    line. So it changes when an image is added, removed, renamed, relabelled or changes size; it
    does not depend on the dataset's name or location, the list's order, blank lines or
    formatting, and not on modification times or on content changes that keep the size.

    Args:
        dataset: the dataset.
        sizes: file sizes in item order, as ``check_images`` found them; read from disk if omitted.
    """
    if sizes is None:
        sizes = _file_sizes(dataset)[0]
    if len(sizes) != len(dataset.items):
        raise InvalidArgument(f"{len(sizes)} sizes for {len(dataset.items)} items")
    digest = hashlib.sha256(_FINGERPRINT_VERSION)
    for item, size in sorted(zip(dataset.items, sizes, strict=True), key=lambda pair: pair[0].path):
        # Junk is written only when there is some, so lists without it keep their fingerprints.
        junk = f"\tjunk:{','.join(item.junk)}" if item.junk else ""
        digest.update(f"{item.path}\t{','.join(item.labels)}{junk}\t{'missing' if size is None else size}\n"
                      .encode())
    return digest.hexdigest()


def check_images(dataset: Dataset) -> CheckedDataset:
    """Finds the images that cannot be used, excludes them, and fingerprints the dataset.

    An image is excluded when its file is missing, not a regular file, empty, not readable by this
    process, or reached through a symlink that leaves the dataset root. Files are not decoded
    here: images the encoder cannot decode are removed afterwards with ``Dataset.without``.

    Returns:
        ``CheckedDataset`` with the usable items, the excluded ones with their reasons, and the
        fingerprint of the dataset as listed.
    """
    sizes, problems = _file_sizes(dataset)
    bad = {p.path for p in problems}
    return CheckedDataset(dataset.without(bad) if bad else dataset, tuple(problems), fingerprint(dataset, sizes))


def split_fingerprint(catalogue: CheckedDataset, queries: CheckedDataset) -> str:
    """SHA-256 (hex) of a split: the catalogue's and the queries' fingerprints, in that order."""
    text = f"split\n{catalogue.fingerprint}\n{queries.fingerprint}\n"
    return hashlib.sha256(text.encode()).hexdigest()
