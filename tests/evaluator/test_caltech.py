"""The real Caltech-101 lists (../shared/datasets/caltech101): 8,677 images, 101 classes, a 5,784 / 2,893 split."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from services.evaluator.datasets import check_images, read_list, read_split_lists, split_fingerprint
from services.evaluator.metrics import encode_labels, leave_one_out


def test_caltech101_list_and_split(caltech101_dir: Path) -> None:
    allowed = [caltech101_dir.parent]
    started = time.perf_counter()
    ds = read_list(caltech101_dir / "list_of_images.txt", allowed_roots=allowed)
    checked = check_images(ds)
    elapsed = time.perf_counter() - started
    assert len(ds) == 8677 and len(ds.classes) == 101 and ds.name == "caltech101"
    assert checked.n_excluded == 0 and len(checked.dataset) == 8677
    assert checked.fingerprint == check_images(ds).fingerprint
    assert elapsed < 5, f"reading and checking 8,677 images took {elapsed:.1f} s"

    split = read_split_lists(caltech101_dir / "split_train.txt", caltech101_dir / "split_test.txt",
                             allowed_roots=allowed)
    assert len(split.catalogue) == 5784 and len(split.queries) == 2893
    labels = {item.path: item.labels for item in ds.items}
    assert all(labels[item.path] == item.labels for item in split.catalogue.items + split.queries.items)
    fp = split_fingerprint(check_images(split.catalogue), check_images(split.queries))
    assert len(fp) == 64 and fp != checked.fingerprint


def test_caltech101_labels_drive_the_metrics(caltech101_dir: Path) -> None:
    ds = read_list(caltech101_dir / "list_of_images.txt", allowed_roots=[caltech101_dir])
    classes, ids = encode_labels(ds.labels)
    assert ids.shape == (8677,) and [classes[i] for i in ids[:3]] == [item.labels[0] for item in ds.items[:3]]
    # Embeddings that are exactly one direction per class: every query ranks its class first.
    x = np.eye(len(classes), dtype=np.float32)[ids]
    m = leave_one_out(x, ids, ks=[1], class_names=classes)
    assert m["n_queries"] == 8677 and m["per_class"]["classes"] == ds.classes
    assert m["map"] == 1.0 and m["precision_at_k"][1] == 1.0
    assert m["n_queries_without_relevant"] == 0
    assert m["per_class"]["n_queries"].sum() == 8677
