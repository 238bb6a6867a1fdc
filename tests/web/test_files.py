"""The gateway serves dataset images and report files only: no path traversal, however it is spelt."""

from __future__ import annotations

import http.client
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.common.errors import InvalidArgument, NotFound
from services.web.config import WebSettings
from services.web.files import DatasetRoots, ReportFiles
from services.web.server import RunningGateway, start_in_thread

SECRET = b"SECRET-OUTSIDE-THE-ROOT"


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """allowed/ds (a dataset with an image, a hidden file, links out of it), allowed/reports, secrets beside them."""
    base = tmp_path_factory.mktemp("files")
    allowed, ds, reports = base / "allowed", base / "allowed" / "ds", base / "allowed" / "reports"
    (ds / "images" / "cat").mkdir(parents=True)
    (ds / "images" / "cat" / "a.jpg").write_bytes(b"\xff\xd8\xff fake jpeg")
    (ds / "list_of_images.txt").write_text("images/cat/a.jpg\tcat\n")
    (ds / ".hidden.jpg").write_bytes(b"hidden")
    (base / "secret.jpg").write_bytes(SECRET)
    (base / "secret.json").write_bytes(SECRET)
    (base / "secrets").mkdir()
    (base / "secrets" / "s.jpg").write_bytes(SECRET)
    (ds / "images" / "link.jpg").symlink_to(base / "secret.jpg")
    (ds / "images" / "linked-dir").symlink_to(base / "secrets")
    (ds / "images" / "inside-link.jpg").symlink_to(ds / "images" / "cat" / "a.jpg")
    (ds / "images" / "list.jpg").symlink_to(ds / "list_of_images.txt")
    (allowed / "deeper" / "nested").mkdir(parents=True)
    (allowed / "deeper" / "nested" / "list_of_images.txt").write_text("x.jpg\tx\n")
    reports.mkdir()
    (reports / "summary.html").write_text("<h1>report</h1>")
    (reports / "figures").mkdir()
    (reports / "figures" / "pr.png").write_bytes(b"\x89PNG fake")
    (reports / "leak.json").symlink_to(base / "secret.json")
    return base


ESCAPES = ["../secret.jpg", "../../secret.jpg", "images/../../secret.jpg", "/etc/passwd", str(Path("/") / "etc"),
           "images/link.jpg", "images/linked-dir/s.jpg", ".hidden.jpg", "images/./cat/a.jpg", "list_of_images.txt",
           "images/list.jpg", "images\\..\\..\\secret.jpg", "images/cat/a.jpg\0.png", ""]


@pytest.mark.parametrize("path", ESCAPES)
def test_image_paths_leaving_the_dataset_are_refused(tree: Path, path: str) -> None:
    roots = DatasetRoots([tree / "allowed"])
    with pytest.raises((InvalidArgument, NotFound)) as err:
        roots.image("ds", path)
    assert err.value.message  # a sentence, e.g. "image '../secret.jpg' leaves the served folder"


def test_images_inside_the_dataset_are_served_with_their_type(tree: Path) -> None:
    roots = DatasetRoots([tree / "allowed"])
    served = roots.image("ds", "images/cat/a.jpg")
    assert served.path == (tree / "allowed" / "ds" / "images" / "cat" / "a.jpg").resolve()
    assert served.media_type == "image/jpeg"
    assert roots.image("ds", "images/inside-link.jpg").path == served.path  # a link that stays inside is fine
    with pytest.raises(NotFound, match="no dataset named 'other'"):
        roots.image("other", "images/cat/a.jpg")
    with pytest.raises(NotFound, match="does not exist"):
        roots.image("ds", "images/cat/missing.jpg")


def test_datasets_are_found_by_name_under_the_allowed_roots(tree: Path) -> None:
    roots = DatasetRoots([tree / "allowed"], explicit=[f"renamed={tree / 'allowed' / 'ds'}"]).roots()
    assert roots["allowed"] == (tree / "allowed").resolve()  # an allowed root, by its folder's name
    assert roots["ds"] == (tree / "allowed" / "ds").resolve()  # a list_of_images.txt one level down
    assert roots["nested"] == (tree / "allowed" / "deeper" / "nested").resolve()  # and two levels down
    assert roots["renamed"] == (tree / "allowed" / "ds").resolve()
    with pytest.raises(InvalidArgument, match="outside the allowed roots"):
        DatasetRoots([tree / "allowed"], explicit=[f"x={tree / 'secrets'}"])


@pytest.mark.parametrize("path", ["../secret.json", "leak.json", "/etc/passwd", "figures/../../secret.json",
                                  "summary.py", ".git/config"])
def test_report_paths_leaving_the_report_directory_are_refused(tree: Path, path: str) -> None:
    with pytest.raises((InvalidArgument, NotFound)):
        ReportFiles(tree / "allowed" / "reports").file(path)


def test_report_files_and_summaries(tree: Path) -> None:
    reports = ReportFiles(tree / "allowed" / "reports")
    assert reports.file("figures/pr.png").media_type == "image/png"
    assert [path for path, _ in reports.summaries()] == ["summary.html"]
    assert reports.relative(str(tree / "allowed" / "reports" / "figures" / "pr.png")) == "figures/pr.png"
    assert reports.relative(str(tree / "secret.json")) is None


@pytest.fixture(scope="module")
def gateway(tree: Path) -> Iterator[RunningGateway]:
    """A gateway over the tree (no services are needed to serve files)."""
    settings = WebSettings(port=0, allowed_roots=[tree / "allowed"], reports_dir=tree / "allowed" / "reports",
                           encoder_address="127.0.0.1:9", search_address="127.0.0.1:9",
                           evaluator_address="127.0.0.1:9")
    running = start_in_thread(settings)
    yield running
    running.stop()


def _raw_get(port: int, target: str) -> tuple[int, bytes]:
    """GET with the request target sent exactly as written (no client-side normalisation of .. or %2F)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest("GET", target, skip_accept_encoding=True)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


RAW_ESCAPES = [
    "/api/images/ds/../../secret.jpg", "/api/images/ds/..%2F..%2Fsecret.jpg", "/api/images/ds/%2e%2e/%2e%2e/secret.jpg",
    "/api/images/ds/images%2F..%2F..%2F..%2Fsecret.jpg", "/api/images/ds/%2Fetc%2Fpasswd", "/api/images/ds//etc/passwd",
    "/api/images/ds/images/link.jpg", "/api/images/ds/images/linked-dir/s.jpg", "/api/images/..%2Fsecrets/s.jpg",
    "/api/images/%2E%2E/secret.jpg", "/api/images/ds/images%5C..%5C..%5Csecret.jpg",
    "/api/images/ds/images/cat/a.jpg%00.png",
    "/reports/..%2Fsecret.json", "/reports/leak.json", "/reports/%2Fetc%2Fpasswd", "/reports/../secret.json",
    "/static/..%2F..%2F..%2Fsecret.jpg", "/static/../app.py",
]


@pytest.mark.parametrize("target", RAW_ESCAPES)
def test_no_request_reaches_a_file_outside_the_roots(gateway: RunningGateway, target: str) -> None:
    status, body = _raw_get(gateway.port, target)
    assert status in (400, 404), (status, body[:200])
    assert SECRET not in body


def test_files_inside_are_served_over_http(gateway: RunningGateway) -> None:
    status, body = _raw_get(gateway.port, "/api/images/ds/images/cat/a.jpg")
    assert status == 200 and body.startswith(b"\xff\xd8")
    status, body = _raw_get(gateway.port, "/reports/summary.html")
    assert status == 200 and b"<h1>report</h1>" in body
