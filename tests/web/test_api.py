"""The gateway's JSON API over the running services: searches, limits, errors as sentences with the
right status, the bearer token passed on, TLS to the services, the encoder down."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trustme
from PIL import Image

from services.common.ids import point_id
from services.search.config import SearchSettings
from services.search.servicer import create_search_server
from services.stack import free_port
from services.web.server import start_in_thread
from tests.web.conftest import ClipGateway, WebStack, held_out

pytestmark = pytest.mark.slow  # real EfficientNet-Lite0 and Caltech-101 images


@pytest.fixture(scope="module")
def api(web_stack: WebStack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=web_stack.url, timeout=60) as client:
        yield client


def _png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (120, 30, 200)).save(out, format="PNG")
    return out.getvalue()


def test_openapi_schema_lists_the_json_endpoints(api: httpx.Client) -> None:
    schema = api.get("/openapi.json").json()
    assert {"/api/search", "/api/search/image", "/api/collections", "/api/models", "/api/runs",
            "/api/runs/{run_id}/events", "/api/images/{dataset}/{path}"} <= set(schema["paths"])
    assert "ErrorBody" in schema["components"]["schemas"]
    assert api.get("/docs").status_code == 404  # FastAPI's docs page loads from a CDN: off


def test_upload_then_reload_by_hash_then_search_with_a_result(web_stack: WebStack, api: httpx.Client) -> None:
    image, label = held_out(web_stack.dataset)[0]
    collection = web_stack.indexed.collection
    first = api.post("/api/search/image", data={"collection": collection, "k": "10", "limit": "5"},
                     files={"file": (image.name, image.read_bytes(), "image/jpeg")})
    assert first.status_code == 200, first.text
    page = first.json()
    assert page["query"].startswith("upload:") and page["total"] == 10 and len(page["hits"]) == 5
    assert page["hits"][0]["labels"] == [label]
    # The same search by its URL state, and its next page (lazy loading).
    again = api.get("/api/search", params={"collection": collection, "query": page["query"], "k": 10,
                                           "limit": 5}).json()
    assert [h["id"] for h in again["hits"]] == [h["id"] for h in page["hits"]]
    rest = api.get("/api/search", params={"collection": collection, "query": page["query"], "k": 10, "offset": 5,
                                          "limit": 5}).json()
    assert [h["rank"] for h in rest["hits"]] == [6, 7, 8, 9, 10]
    assert not {h["id"] for h in rest["hits"]} & {h["id"] for h in page["hits"]}
    # "Search with this": by the stored point, which is itself excluded.
    chosen = page["hits"][0]
    similar = api.get("/api/search", params={"collection": collection, "query": f"id:{chosen['id']}", "k": 5}).json()
    assert chosen["id"] not in [h["id"] for h in similar["hits"]] and similar["hits"][0]["labels"] == [label]
    # Images are served from the dataset.
    served = api.get(chosen["image"])
    assert served.status_code == 200 and served.headers["content-type"] == "image/jpeg"


def test_label_filter_and_near_duplicates(web_stack: WebStack, api: httpx.Client) -> None:
    collection = web_stack.indexed.collection
    labels = api.get(f"/api/collections/{collection}/labels").json()["labels"]
    assert len(labels) == 6
    first = (web_stack.dataset / "list_of_images.txt").read_text().splitlines()[0].split("\t")[0]
    query = f"id:{point_id(web_stack.indexed.dataset, first)}"
    only = api.get("/api/search", params={"collection": collection, "query": query, "k": 48,
                                          "labels": f"{labels[1]},{labels[2]}"}).json()
    assert only["total"] == 16 and {h["labels"][0] for h in only["hits"]} == {labels[1], labels[2]}
    everything = api.get("/api/search", params={"collection": collection, "query": query, "k": 47}).json()
    strict = api.get("/api/search", params={"collection": collection, "query": query, "k": 47,
                                            "duplicates": 0.6}).json()
    assert strict["hidden_duplicates"] > 0 and strict["total"] == 47 - strict["hidden_duplicates"]
    # The best hit always stays; hidden ones were near a better-ranked shown one.
    assert strict["hits"][0]["id"] == everything["hits"][0]["id"]


@pytest.mark.parametrize(("request_args", "status", "code", "words"), [
    ({"params": {"collection": "nope", "query": "text:x"}}, 404, "NOT_FOUND", "No collection or alias named"),
    ({"params": {"collection": "C", "query": "what:x"}}, 400, "INVALID_ARGUMENT", "is not one of"),
    ({"params": {"collection": "C", "query": "text:a cat"}}, 400, "INVALID_ARGUMENT", "has no text tower"),
    ({"params": {"collection": "C", "query": "id:not-a-uuid"}}, 400, "INVALID_ARGUMENT", "search service refused"),
    ({"params": {"collection": "C", "query": "upload:0123abcd"}}, 404, "NOT_FOUND", "upload it again"),
    ({"params": {"collection": "C", "query": "text:x", "k": 5000}}, 400, "INVALID_ARGUMENT", "k:"),
    ({"params": {"collection": "C", "query": "text:x", "model": "resnet18"}}, 400, "INVALID_ARGUMENT",
     "search it with efficientnet-lite0"),
])
def test_errors_are_sentences_with_the_status_of_their_code(web_stack: WebStack, api: httpx.Client,
                                                            request_args: dict[str, dict[str, object]], status: int,
                                                            code: str, words: str) -> None:
    params = {k: (web_stack.indexed.collection if v == "C" else v) for k, v in request_args["params"].items()}
    response = api.get("/api/search", params=params)
    body = response.json()
    assert (response.status_code, body["code"]) == (status, code), body
    assert words in body["error"] and "Traceback" not in body["error"] and body["error"].endswith(".")


def test_uploads_over_the_limits_or_not_images_are_refused_before_the_encoder(web_stack: WebStack,
                                                                              api: httpx.Client) -> None:
    form = {"collection": web_stack.indexed.collection}
    cases = [
        (b"this is not an image", 400, "not an image the platform can read"),
        (_png(3000, 2000), 413, "6.0 megapixels"),  # small file, too many pixels (limit 4 MP here)
        (b"\xff" * 3_000_000, 413, "larger than the limit"),  # refused by Content-Length, never read
        (b"", 400, "empty"),
    ]
    for data, status, words in cases:
        response = api.post("/api/search/image", data=form, files={"file": ("q.jpg", data, "image/jpeg")})
        assert response.status_code == status and words in response.json()["error"], response.text
    # A chunked upload (no Content-Length) is counted while it is read.
    body = b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"q.jpg\"\r\n\r\n" + b"\0" * 3_000_000

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(body), 65536):
            yield body[i:i + 65536]

    response = api.post("/api/search/image", content=chunks(),
                        headers={"content-type": "multipart/form-data; boundary=b"})
    assert response.status_code == 413 and "larger than the limit" in response.json()["error"]


def test_with_the_encoder_down_uploads_say_so_and_stored_image_searches_still_work(web_stack: WebStack) -> None:
    down = start_in_thread(web_stack.gateway_settings(encoder_address=f"127.0.0.1:{free_port()}"))
    try:
        with httpx.Client(base_url=down.url, timeout=60) as client:
            health = {s["name"]: s for s in client.get("/api/health").json()["services"]}
            assert not health["encoder"]["serving"] and health["search"]["serving"]
            assert "searching by image or text is off" in health["encoder"]["message"]
            image, _ = held_out(web_stack.dataset)[0]
            response = client.post("/api/search/image", data={"collection": web_stack.indexed.collection},
                                   files={"file": (image.name, image.read_bytes(), "image/jpeg")})
            assert response.status_code == 503 and response.json()["code"] == "UNAVAILABLE"
            assert "encoder service" in response.json()["error"] and "not reachable" in response.json()["error"]
            models = client.get("/api/models")
            assert models.status_code == 503
            first = (web_stack.dataset / "list_of_images.txt").read_text().splitlines()[0].split("\t")[0]
            by_id = client.get("/api/search", params={"collection": web_stack.indexed.collection,
                                                      "query": f"id:{point_id(web_stack.indexed.dataset, first)}"})
            assert by_id.status_code == 200 and by_id.json()["hits"]
    finally:
        down.stop()


@pytest.fixture(scope="module")
def guarded_search(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A search service that requires the token 't0ken' and serves TLS; yields its address and CA file."""
    work = tmp_path_factory.mktemp("guarded")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_pem.write_to_path(str(work / "s.key"))
    cert.cert_chain_pems[0].write_to_path(str(work / "s.crt"))
    ca.cert_pem.write_to_path(str(work / "ca.crt"))
    running, core = create_search_server(SearchSettings(
        port=0, metrics_port=-1, data_dir=work / "q", auth_token="t0ken", tls_cert_file=work / "s.crt",
        tls_key_file=work / "s.key"))
    try:
        yield f"127.0.0.1:{running.port}", work / "ca.crt"
    finally:
        running.stop(0)
        core.close()


def test_the_callers_token_goes_on_to_the_services_over_tls(web_stack: WebStack,
                                                            guarded_search: tuple[str, Path]) -> None:
    address, ca_file = guarded_search
    gateway = start_in_thread(web_stack.gateway_settings(search_address=address, service_tls_ca_file=ca_file))
    try:
        with httpx.Client(base_url=gateway.url, timeout=60) as client:
            refused = client.get("/api/collections")
            assert refused.status_code == 401 and "refused the access token" in refused.json()["error"]
            assert client.get("/api/collections", headers={"Authorization": "Bearer t0ken"}).status_code == 200
    finally:
        gateway.stop()


def test_a_gateway_with_a_token_checks_it_header_for_everything_cookie_for_gets_only(web_stack: WebStack) -> None:
    gateway = start_in_thread(web_stack.gateway_settings(auth_token="s3cret"))
    image = (web_stack.dataset / "list_of_images.txt").read_text().splitlines()[0].split("\t")[0]
    url = f"/api/images/{web_stack.indexed.dataset}/{image}"
    try:
        with httpx.Client(base_url=gateway.url, timeout=60) as client:
            assert client.get("/").status_code == 200  # the page itself, with its login field
            missing = client.get("/api/collections")
            assert missing.status_code == 401 and "access token" in missing.json()["error"]
            wrong = client.get("/api/collections", headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401 and "wrong" in wrong.json()["error"]
            assert client.get("/api/collections", headers={"Authorization": "Bearer s3cret"}).status_code == 200
            assert client.get(url).status_code == 401
            assert client.get(url, headers={"Cookie": "retrieval_token=s3cret"}).status_code == 200  # <img> requests
            posted = client.post("/api/runs", json={"dataset": "x", "models": ["m"]},
                                 headers={"Cookie": "retrieval_token=s3cret"})
            assert posted.status_code == 401  # a cookie never authorises a state change (cross-site requests)
    finally:
        gateway.stop()


def test_runs_unknown_and_bad_are_refused_as_sentences(api: httpx.Client) -> None:
    missing = api.get("/api/runs/nope")
    assert missing.status_code == 404 and "No run 'nope'" in missing.json()["error"]
    assert api.get("/api/runs/nope/events").status_code == 404
    unknown = api.post("/api/runs", json={"dataset": "not-served", "models": ["efficientnet-lite0"]})
    assert unknown.status_code == 404 and "no dataset named 'not-served'" in unknown.json()["error"]
    bad = api.post("/api/runs", json={"dataset": "x", "models": []})
    assert bad.status_code == 400 and bad.json()["error"].startswith("Invalid request: models")


def test_text_queries_go_to_a_text_tower(clip_gateway: ClipGateway) -> None:
    with httpx.Client(base_url=clip_gateway.web.url, timeout=120) as client:
        models = {m["id"]: m for m in client.get("/api/models").json()}
        assert models["clip-vit-b-32"]["text"] and not models["efficientnet-lite0"]["text"]
        page = client.get("/api/search", params={"collection": clip_gateway.collection,
                                                 "query": "text:a photo of a laptop", "k": 10}).json()
        assert page["model"] == "clip-vit-b-32" and page["query"] == "text:a photo of a laptop"
        assert len(page["hits"]) == 10
        long = client.get("/api/search", params={"collection": clip_gateway.collection, "query": "text:" + "x" * 1001})
        assert long.status_code == 400 and "at most 1000" in long.json()["error"]
