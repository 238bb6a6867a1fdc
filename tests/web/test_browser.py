"""The search page in a real browser (Debian's headless Chromium, driven by playwright) against the
services on a Caltech-101 sample: upload, results of the query's class on top, "search with this",
reload, a bad upload, the keyboard, phone width, the report browser with a live run, the encoder down.

Screenshots are kept in ``$WEB_SCREENSHOTS`` (default: a folder under pytest's temporary directory),
printed at the end of the session.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.stack import free_port
from services.web.server import start_in_thread
from tests.conftest import require_binary
from tests.web.conftest import ClipGateway, WebStack, held_out

pytestmark = pytest.mark.slow

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 60_000
FIRST_PAGE = 24  # results the page fetches at first (app.js PAGE)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """Debian's chromium (playwright cannot download browsers here); fails in CI when it is missing."""
    executable = require_binary("chromium", package="chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


class Page:
    """A browser tab on the gateway that records every request it makes (none may leave the gateway)."""

    def __init__(self, browser: object, base: str, width: int = 1280, height: int = 900) -> None:
        self.base = base
        self.context = browser.new_context(viewport={"width": width, "height": height})  # type: ignore[attr-defined]
        self.page = self.context.new_page()
        self.page.set_default_timeout(TIMEOUT_MS)
        self.requests: list[str] = []
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.console_errors: list[str] = []
        self.page.on("console", lambda m: self.console_errors.append(m.text) if m.type == "error" else None)

    def open(self, query: str = "") -> None:
        self.page.goto(self.base + query)
        self.page.wait_for_function("() => document.querySelector('#collection').options.length > 0")

    def results(self) -> list[str]:
        """Point ids of the results shown, in order."""
        return self.page.eval_on_selector_all("#results li.card", "els => els.map(e => e.dataset.id)")

    def labels(self) -> list[str]:
        return self.page.eval_on_selector_all("#results li.card .label", "els => els.map(e => e.textContent)")

    def wait_results(self, previous: list[str] | None = None) -> list[str]:
        """Waits for results (different from ``previous`` when given) and for their first images to load;
        returns the first page's point ids."""
        self.page.wait_for_selector("#results li.card")
        if previous is not None:
            self.page.wait_for_function("prev => { const ids = [...document.querySelectorAll('#results li.card')]"
                                        ".map(e => e.dataset.id).slice(0, 24); return ids.length && "
                                        "ids.join() !== prev; }",
                                        arg=",".join(previous))
        self.page.wait_for_function("() => [...document.querySelectorAll('#results img')].slice(0, 4)"
                                    ".every(i => i.complete && i.naturalWidth > 0)")
        return self.results()[:FIRST_PAGE]  # a next page may or may not be there yet (lazy loading)

    def shot(self, folder: Path, name: str, full: bool = False) -> Path:
        """A screenshot once the images in view have loaded (lazy ones below the fold stay unloaded)."""
        self.page.wait_for_function("() => [...document.images].filter(i => i.getBoundingClientRect().top "
                                    "< innerHeight && i.getClientRects().length).every(i => i.complete)")
        path = folder / name
        self.page.screenshot(path=str(path), full_page=full)
        return path

    def check_all_local(self) -> None:
        outside = [u for u in self.requests if not u.startswith((self.base, "data:", "blob:"))]
        assert not outside, f"requests left the gateway: {outside}"

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def tab(browser: object, web_stack: WebStack) -> Iterator[Page]:
    page = Page(browser, web_stack.url.rstrip("/"))
    yield page
    page.check_all_local()
    page.close()


def test_upload_shows_its_class_on_top_a_result_searches_again_and_reload_repeats(
        tab: Page, web_stack: WebStack, shots: Path) -> None:
    image, label = held_out(web_stack.dataset)[0]
    tab.open(f"/?c={web_stack.indexed.collection}")
    assert tab.page.locator("#text").is_disabled()  # EfficientNet has no text tower, and the page says so
    assert "no text tower" in tab.page.inner_text("#text-note")
    tab.page.set_input_files("#file", str(image))
    first = tab.wait_results()
    labels = tab.labels()
    assert labels[0] == label and labels[:5].count(label) >= 4, labels[:10]
    assert re.search(r"[?&]q=upload%3A[0-9a-f]{32}", tab.page.url), tab.page.url
    upload_url = tab.page.url
    alts = tab.page.eval_on_selector_all("#results img", "els => els.map(e => e.alt)")
    assert all(label in alt for alt in alts[:4]) and all(alts)
    assert tab.page.inner_text("#results li.card .rank >> nth=0") == "#1"
    tab.shot(shots, "search.png")

    # Reload: the URL alone gives the same results.
    tab.page.reload()
    assert tab.wait_results() == first
    # Even after the gateway forgot the upload (a restart): this tab sends the image again.
    web_stack.web.gateway._queries.clear()
    web_stack.web.gateway._results.clear()
    tab.page.reload()
    again = tab.wait_results()
    assert again == first and tab.page.url == upload_url

    # "Search with this" on the third result: a new search by that stored image.
    chosen = first[2]
    tab.page.locator("#results li.card >> nth=2").get_by_role("button", name=re.compile("^Search with")).click()
    second = tab.wait_results(previous=first)
    assert f"q=id%3A{chosen}" in tab.page.url and chosen not in second
    assert tab.labels()[0] == label
    tab.page.reload()
    assert tab.wait_results() == second

    # Back to the upload's results, from the history.
    tab.page.go_back()
    assert tab.wait_results(previous=second) == first and tab.page.url == upload_url

    # Lazy loading: k = 40 shows 24 at first, the rest when scrolled to.
    tab.page.fill("#k", "40")
    tab.page.click("#apply")
    tab.page.wait_for_function("() => document.querySelector('#summary').textContent.includes('40 results')")
    assert len(tab.results()) == 24
    tab.page.locator("#more").scroll_into_view_if_needed()
    tab.page.wait_for_function("() => document.querySelectorAll('#results li.card').length === 40")


def test_a_bad_upload_shows_a_sentence(tab: Page, web_stack: WebStack, shots: Path, tmp_path: Path) -> None:
    bad = tmp_path / "holiday.jpg"
    bad.write_bytes(b"this is a text file, not a photo\n")
    tab.open(f"/?c={web_stack.indexed.collection}")
    tab.page.set_input_files("#file", str(bad))
    error = tab.page.locator("#error")
    error.wait_for(state="visible")
    assert "not an image the platform can read" in error.inner_text()
    tab.shot(shots, "bad-upload.png")
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\xff\xd8" + b"\0" * 3_000_000)  # over this gateway's 2 MB limit
    tab.page.set_input_files("#file", str(big))
    tab.page.wait_for_function("() => document.querySelector('#error').textContent.includes('larger than the limit')")


def test_the_search_works_from_the_keyboard_and_inputs_are_labelled(tab: Page, web_stack: WebStack) -> None:
    image, _ = held_out(web_stack.dataset)[1]
    tab.open(f"/?c={web_stack.indexed.collection}")
    tab.page.set_input_files("#file", str(image))
    first = tab.wait_results()
    unlabelled = tab.page.evaluate("""[...document.querySelectorAll('input, select')]
        .filter(e => e.type !== 'hidden' && e.labels.length === 0).map(e => e.id)""")
    assert unlabelled == []
    # Tab from the top of the page to the first result, open it with Enter, close it with Escape.
    tab.page.focus("body")
    for _ in range(80):
        tab.page.keyboard.press("Tab")
        if tab.page.evaluate("document.activeElement.matches('#results li.card:first-child .thumb')"):
            break
    else:
        pytest.fail("Tab never reached the first result")
    tab.page.keyboard.press("Enter")
    assert tab.page.locator("#viewer").is_visible()
    assert tab.page.evaluate("document.activeElement.id") == "viewer-search"
    tab.page.keyboard.press("Escape")
    assert not tab.page.locator("#viewer").is_visible()
    # Its "Search with this" button is the next stop; Enter searches with that image.
    tab.page.keyboard.press("Tab")
    assert tab.page.evaluate("document.activeElement.matches('#results li.card:first-child .similar')")
    tab.page.keyboard.press("Enter")
    tab.wait_results(previous=first)
    assert f"q=id%3A{first[0]}" in tab.page.url
    # The options from the keyboard: k, then Enter in the form searches again with it.
    tab.page.focus("#k")
    tab.page.keyboard.press("Control+a")
    tab.page.keyboard.type("5")
    tab.page.keyboard.press("Enter")
    tab.page.wait_for_function("() => document.querySelectorAll('#results li.card').length === 5")
    assert "k=5" in tab.page.url


def test_phone_width(browser: object, web_stack: WebStack, shots: Path) -> None:
    phone = Page(browser, web_stack.url.rstrip("/"), width=390, height=844)
    try:
        image, label = held_out(web_stack.dataset)[2]
        phone.open(f"/?c={web_stack.indexed.collection}")
        phone.page.set_input_files("#file", str(image))
        phone.wait_results()
        assert phone.labels()[0] == label
        assert phone.page.evaluate("document.documentElement.scrollWidth") <= 390  # no sideways scrolling
        width = phone.page.evaluate("document.querySelector('#results li.card').getBoundingClientRect().width")
        assert 120 < width < 200  # two columns
        phone.shot(shots, "phone-390.png")
        phone.check_all_local()
    finally:
        phone.close()


def test_report_browser_starts_a_run_watches_it_live_and_opens_reports(tab: Page, web_stack: WebStack,
                                                                       shots: Path) -> None:
    from services.evaluator.reports import aggregate

    tab.open("/?view=reports")
    tab.page.wait_for_function("() => document.querySelector('#run-dataset').options.length > 0")
    tab.page.select_option("#run-dataset", web_stack.dataset.name)
    tab.page.select_option("#run-models", "efficientnet-lite0")
    tab.page.fill("#run-name", "from-the-page")
    # Every text the progress line shows, as it changes (the stream is pushed, not polled).
    tab.page.evaluate("""window.stages = [];
        new MutationObserver(() => window.stages.push(document.querySelector('#run-stage').textContent))
            .observe(document.querySelector('#run-stage'), {childList: true, characterData: true, subtree: true});""")
    tab.page.click("#run-start")
    tab.page.wait_for_function("() => document.querySelector('#run-stage').textContent.includes('succeeded')",
                               timeout=180_000)
    stages = tab.page.evaluate("window.stages")
    assert any("running" in s for s in stages) and len(stages) >= 3, stages
    assert "efficientnet-lite0 mAP 0." in tab.page.inner_text("#run-stage")
    # The run's report, from the run list.
    tab.page.get_by_role("button", name=re.compile("^Open .*efficientnet-lite0")).first.click()
    tab.page.wait_for_selector("#report-body figure img")
    tab.page.wait_for_function("() => [...document.querySelectorAll('#report-body img')]"
                               ".every(i => i.complete && i.naturalWidth > 0)")
    assert "mAP" in tab.page.inner_text("#report-body")
    assert "report=from-the-page" in tab.page.url
    tab.shot(shots, "report.png", full=True)
    # An aggregated summary.html (what `retrieval eval report` writes), opened in the page's frame.
    aggregate(web_stack.settings.reports_dir / "from-the-page")
    tab.page.reload()
    tab.page.get_by_role("button", name="from-the-page/summary.html").click()
    frame = tab.page.frame_locator("#report-frame")
    assert "Retrieval benchmark report" in frame.locator("h1").inner_text()
    frame.locator("img").first.wait_for()
    assert frame.locator("img").first.evaluate("i => i.complete && i.naturalWidth > 0")


def test_with_the_encoder_down_the_page_says_so_and_keeps_working(browser: object, web_stack: WebStack,
                                                                  shots: Path) -> None:
    from services.common.ids import point_id

    down = start_in_thread(web_stack.gateway_settings(encoder_address=f"127.0.0.1:{free_port()}"))
    page = Page(browser, down.url.rstrip("/"))
    try:
        first = (web_stack.dataset / "list_of_images.txt").read_text().splitlines()[0].split("\t")[0]
        query = f"id:{point_id(web_stack.indexed.dataset, first)}"
        page.open(f"/?c={web_stack.indexed.collection}&q={query}")
        banner = page.page.locator("#banner")
        banner.wait_for(state="visible")
        assert "encoder service" in banner.inner_text() and "not reachable" in banner.inner_text()
        assert page.page.locator("#file").is_disabled() and "encoder is not reachable" in page.page.inner_text(
            "#file-note")
        assert page.wait_results()  # searching with a stored image needs no encoder
        page.shot(shots, "encoder-down.png")
        page.check_all_local()
    finally:
        page.close()
        down.stop()


def test_a_text_query_for_a_model_with_a_text_tower(browser: object, clip_gateway: ClipGateway) -> None:
    page = Page(browser, clip_gateway.web.url.rstrip("/"))
    try:
        page.open(f"/?c={clip_gateway.collection}")
        text = page.page.locator("#text")
        assert text.is_enabled() and page.page.inner_text("#text-note") == ""
        text.fill("a photo of a laptop")
        text.press("Enter")
        first = page.wait_results()
        assert "q=text%3Aa+photo+of+a+laptop" in page.page.url
        page.page.reload()
        assert page.wait_results() == first and page.page.input_value("#text") == "a photo of a laptop"
        page.check_all_local()
    finally:
        page.close()
