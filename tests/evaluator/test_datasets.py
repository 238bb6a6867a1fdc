"""Dataset readers on small trees in tmp_path: lists, folders, splits, safety, checks, fingerprints."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from services.common.errors import InvalidArgument, NotFound
from services.evaluator.datasets import (
    Item,
    check_images,
    fingerprint,
    open_dataset,
    read_folders,
    read_list,
    read_split_folders,
    read_split_lists,
)


def touch(root: Path, rel: str, size: int = 10) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\xff" * size)


def write_list(root: Path, lines: list[str], name: str = "list_of_images.txt") -> Path:
    path = root / name
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for rel in ("img/a1.jpg", "img/a2.jpg", "img/b1.jpg", "img/ab.jpg"):
        touch(tmp_path, rel)
    return tmp_path


def test_list_with_multi_label_lines_blank_lines_and_crlf(tree: Path) -> None:
    (tree / "list_of_images.txt").write_bytes(
        b"img/a1.jpg\ta\r\n\r\nimg/a2.jpg\t a \r\n   \nimg/ab.jpg\tb, a\nimg/b1.jpg\tb\n")
    ds = read_list(tree / "list_of_images.txt", allowed_roots=[tree])
    assert ds.items == (Item("img/a1.jpg", ("a",)), Item("img/a2.jpg", ("a",)), Item("img/ab.jpg", ("a", "b")),
                        Item("img/b1.jpg", ("b",)))
    assert ds.classes == ["a", "b"] and ds.name == tree.name and ds.root == tree.resolve()
    assert ds.path_of(ds.items[0]) == tree.resolve() / "img/a1.jpg"


@pytest.mark.parametrize(("line", "message"), [
    ("img/b1.jpg", "list_of_images.txt:3: expected 'relative/path<TAB>class"),
    ("img/b1.jpg\tb\textra", "list_of_images.txt:3: expected"),
    ("img/b1.jpg\ta,,b", "list_of_images.txt:3: empty class name"),
    ("\tb", "list_of_images.txt:3: empty image path"),
    ("img/a1.jpg\tb", "list_of_images.txt:3: 'img/a1.jpg' is already listed on line 1"),
])
def test_malformed_line_names_file_and_line(tree: Path, line: str, message: str) -> None:
    list_file = write_list(tree, ["img/a1.jpg\ta", "", line])
    with pytest.raises(InvalidArgument, match=message):
        read_list(list_file, allowed_roots=[tree])


@pytest.mark.parametrize("path", ["../outside.jpg", "img/../../outside.jpg", "/etc/passwd", "..", "."])
def test_paths_leaving_the_root_are_refused(tree: Path, path: str) -> None:
    list_file = write_list(tree, ["img/a1.jpg\ta", f"{path}\tb"])
    message = r"list_of_images\.txt:2: image path .* (leaves the dataset root|is absolute)"
    with pytest.raises(InvalidArgument, match=message):
        read_list(list_file, allowed_roots=[tree])


def test_dot_dot_inside_the_root_is_normalised(tree: Path) -> None:
    ds = read_list(write_list(tree, ["img/../img/a1.jpg\ta", "./img/b1.jpg\tb"]), allowed_roots=[tree])
    assert [item.path for item in ds.items] == ["img/a1.jpg", "img/b1.jpg"]


def test_only_allowed_roots(tree: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    list_file = write_list(tree, ["img/a1.jpg\ta"])
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    with pytest.raises(InvalidArgument, match="outside the allowed roots"):
        read_list(list_file, allowed_roots=[elsewhere])
    with pytest.raises(InvalidArgument, match="outside the allowed roots"):
        read_list(list_file, allowed_roots=[tree], root=elsewhere)
    (elsewhere / "link").symlink_to(tree)  # a link inside an allowed root that points out of it
    with pytest.raises(InvalidArgument, match="outside the allowed roots"):
        read_list(elsewhere / "link" / "list_of_images.txt", allowed_roots=[elsewhere])
    with pytest.raises(InvalidArgument, match="no allowed dataset roots"):
        read_list(list_file, allowed_roots=[])
    with pytest.raises(NotFound, match="does not exist"):
        read_list(tree / "nope.txt", allowed_roots=[tree])
    with pytest.raises(InvalidArgument, match="outside the allowed roots"):  # not NotFound: no probing outside
        read_list(elsewhere / "nope.txt", allowed_roots=[tree])
    with pytest.raises(InvalidArgument, match="has no images"):
        read_list(write_list(tree, ["", "  "], "empty.txt"), allowed_roots=[tree])


def test_folder_per_class(tmp_path: Path) -> None:
    for rel in ("cat/2.jpg", "cat/1.PNG", "dog/x.webp", "cat/notes.txt", "cat/.hidden.jpg", ".git/y.jpg",
                "dog/deeper/z.jpg", "loose.jpg"):
        touch(tmp_path, rel)
    ds = read_folders(tmp_path, allowed_roots=[tmp_path], name="pets")
    assert ds.name == "pets"
    assert ds.items == (Item("cat/1.PNG", ("cat",)), Item("cat/2.jpg", ("cat",)), Item("dog/x.webp", ("dog",)))
    assert open_dataset(tmp_path, allowed_roots=[tmp_path]).items == ds.items
    with pytest.raises(InvalidArgument, match="no images"):
        read_folders(tmp_path / "dog" / "deeper", allowed_roots=[tmp_path])


def test_split_lists_take_labels_from_the_labelled_list(tree: Path) -> None:
    write_list(tree, ["img/a1.jpg\ta", "img/a2.jpg\ta", "img/b1.jpg\tb", "img/ab.jpg\ta,b"])
    train = write_list(tree, ["img/a1.jpg", "img/b1.jpg"], "split_train.txt")
    test = write_list(tree, ["img/a2.jpg", "img/ab.jpg\tc"], "split_test.txt")  # its own class wins
    split = read_split_lists(train, test, allowed_roots=[tree])
    assert split.catalogue.items == (Item("img/a1.jpg", ("a",)), Item("img/b1.jpg", ("b",)))
    assert split.queries.items == (Item("img/a2.jpg", ("a",)), Item("img/ab.jpg", ("c",)))
    assert open_dataset(tree, allowed_roots=[tree]).classes == ["a", "b"]  # the list wins over folders


def test_split_lists_errors(tree: Path) -> None:
    write_list(tree, ["img/a1.jpg\ta", "img/a2.jpg\ta"])
    train = write_list(tree, ["img/a1.jpg", "img/b1.jpg"], "split_train.txt")
    test = write_list(tree, ["img/a2.jpg"], "split_test.txt")
    with pytest.raises(InvalidArgument, match=r"split_train\.txt:2: 'img/b1\.jpg' has no class"):
        read_split_lists(train, test, allowed_roots=[tree])
    overlap = write_list(tree, ["img/a1.jpg"], "split_overlap.txt")
    with pytest.raises(InvalidArgument, match=r"1 images are both catalogue and query, e\.g\. 'img/a1\.jpg'"):
        read_split_lists(overlap, overlap, allowed_roots=[tree])
    escape = write_list(tree, ["../x.jpg\ta"], "split_escape.txt")
    with pytest.raises(InvalidArgument, match=r"split_escape\.txt:1: .* leaves the dataset root"):
        read_split_lists(escape, test, allowed_roots=[tree])


def test_split_folders(tmp_path: Path) -> None:
    for rel in ("train/cat/1.jpg", "train/dog/2.jpg", "test/cat/3.jpg"):
        touch(tmp_path, rel)
    split = read_split_folders(tmp_path, allowed_roots=[tmp_path])
    assert split.catalogue.items == (Item("train/cat/1.jpg", ("cat",)), Item("train/dog/2.jpg", ("dog",)))
    assert split.queries.items == (Item("test/cat/3.jpg", ("cat",)),)
    assert split.catalogue.root == split.queries.root == tmp_path.resolve()
    shutil.rmtree(tmp_path / "test")
    with pytest.raises(InvalidArgument, match="needs test/<class>/<image>"):
        read_split_folders(tmp_path, allowed_roots=[tmp_path])


def test_unusable_images_are_reported_and_excluded(tree: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    outside = tmp_path_factory.mktemp("outside")
    touch(outside, "secret.jpg")
    touch(tree, "img/empty.jpg", size=0)
    (tree / "img" / "folder.jpg").mkdir()
    (tree / "img" / "escape.jpg").symlink_to(outside / "secret.jpg")
    (tree / "img" / "inner.jpg").symlink_to(tree / "img" / "a1.jpg")  # a link that stays inside is fine
    (tree / "linked").symlink_to(outside)
    names = ["a1", "missing", "empty", "folder", "escape", "inner", "b1"]
    lines = [f"img/{n}.jpg\ta" for n in names] + ["linked/secret.jpg\ta"]
    checked = check_images(read_list(write_list(tree, lines), allowed_roots=[tree]))
    assert [item.path for item in checked.dataset.items] == ["img/a1.jpg", "img/inner.jpg", "img/b1.jpg"]
    assert checked.n_excluded == 5
    assert [(u.path, u.reason) for u in checked.unreadable] == [
        ("img/missing.jpg", "missing"),
        ("img/empty.jpg", "empty file (0 bytes)"),
        ("img/folder.jpg", "not a regular file"),
        ("img/escape.jpg", "resolves outside the dataset root (symlink)"),
        ("linked/secret.jpg", "its folder resolves outside the dataset root (symlink)"),
    ]


def test_unreadable_permission_is_reported(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests may run as root, which reads any file whatever its mode: deny access for one path instead.
    denied = str(tree.resolve() / "img" / "b1.jpg")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: path != denied and real_access(path, mode))
    checked = check_images(read_list(write_list(tree, ["img/a1.jpg\ta", "img/b1.jpg\tb"]), allowed_roots=[tree]))
    assert [(u.path, u.reason) for u in checked.unreadable] == [("img/b1.jpg", "permission denied")]


def test_fingerprint_covers_paths_labels_and_sizes(tree: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    lines = ["img/a1.jpg\ta", "img/b1.jpg\tb", "img/ab.jpg\ta,b"]
    base = check_images(read_list(write_list(tree, lines), allowed_roots=[tree])).fingerprint
    assert len(base) == 64 and fingerprint(read_list(tree / "list_of_images.txt", allowed_roots=[tree])) == base
    # Order, blank lines and label order do not matter.
    same = ["", "img/ab.jpg\tb,a", "img/b1.jpg\tb", "img/a1.jpg\ta"]
    assert fingerprint(read_list(write_list(tree, same), allowed_roots=[tree])) == base
    # Nor does the location: a copy elsewhere has the same fingerprint.
    copy = tmp_path_factory.mktemp("copy") / "data"
    shutil.copytree(tree, copy)
    assert fingerprint(read_list(copy / "list_of_images.txt", allowed_roots=[copy])) == base
    # A label, a size, a missing file or one more image all change it.
    relabelled = ["img/a1.jpg\tz", *lines[1:]]
    assert fingerprint(read_list(write_list(tree, relabelled), allowed_roots=[tree])) != base
    ds = read_list(write_list(tree, lines), allowed_roots=[tree])
    touch(tree, "img/b1.jpg", size=11)
    resized = fingerprint(ds)
    assert resized != base
    (tree / "img" / "b1.jpg").unlink()
    assert fingerprint(ds) not in (base, resized)
    touch(tree, "img/b1.jpg", size=10)
    assert fingerprint(ds) == base
    assert fingerprint(read_list(write_list(tree, [*lines, "img/a2.jpg\ta"]), allowed_roots=[tree])) != base


def test_without_drops_named_items(tree: Path) -> None:
    ds = read_list(write_list(tree, ["img/a1.jpg\ta", "img/b1.jpg\tb"]), allowed_roots=[tree])
    assert [i.path for i in ds.without(["img/a1.jpg"]).items] == ["img/b1.jpg"]
    assert len(ds) == 2 and ds.labels == [("a",), ("b",)]
