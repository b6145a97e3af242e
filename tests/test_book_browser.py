"""Every page of the book built from the smoke results, opened in headless Chromium (Debian's `chromium`, which
.ci/run installs): no JavaScript error, no failed request of a local resource, no broken image, no empty table."""
import contextlib
import functools
import http.server
import os
import shutil
import threading
from pathlib import Path

import pytest
from playwright.sync_api import Error as PlaywrightError

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")

# after the page loaded: load lazy images now, then list the broken images and the tables without body rows
CHECKS = """async () => {
  const images = [...document.images];
  images.forEach(img => { img.loading = "eager"; });
  await Promise.all(images.map(img => img.decode().catch(() => null)));
  const where = el => (el.closest("section[id]") || {}).id || "page";
  return {
    broken_images: images.filter(img => img.naturalWidth === 0).map(img => img.getAttribute("src")),
    empty_tables: [...document.querySelectorAll("table")]
      .filter(t => t.querySelectorAll("tr").length - t.querySelectorAll("thead tr").length === 0)
      .map(t => `table in ${where(t)}`),
  };
}"""


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class _Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # a connection the browser dropped (a redirect, a cancelled load): not the book's fault


@contextlib.contextmanager
def served(html: Path):
    """The built HTML over a local HTTP server, as a reader's browser would get it; yields its base URL."""
    server = _Server(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(html)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def _checked(page, name: str) -> dict:
    """The page's broken images and empty tables, once it settled (a redirect page navigates on after load)."""
    for _ in range(3):
        try:
            page.wait_for_load_state("load")
            return page.evaluate(CHECKS)
        except PlaywrightError as err:
            if "context was destroyed" not in str(err):
                raise
    raise AssertionError(f"{name} kept navigating")


def browser_problems(html: Path, chromium: str) -> tuple[list[str], list[str]]:
    """Open every page of the built book ``html`` in headless Chromium: the pages, and every problem found."""
    from playwright.sync_api import sync_playwright

    pages = sorted(p.relative_to(html).as_posix() for p in html.rglob("*.html")
                   if not {"_static", "_sources", "_images"} & set(p.relative_to(html).parts))
    problems: list[str] = []
    with served(html) as base, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        current = {"url": ""}
        # offline like CI: requests that leave this server are refused; only local resources must load
        page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(base) else route.abort())
        page.on("pageerror", lambda err: problems.append(f"{current['url']}: JavaScript error: {err}"))
        # (ERR_ABORTED: a request the page's own navigation cancelled, as index.html's redirect does)
        page.on("requestfailed", lambda req: req.url.startswith(base) and req.failure != "net::ERR_ABORTED" and problems.append(
            f"{current['url']}: request failed: {req.url} ({req.failure})"))
        page.on("response", lambda resp: resp.url.startswith(base) and resp.status >= 400 and problems.append(
            f"{current['url']}: HTTP {resp.status} for {resp.url}"))
        for name in pages:
            current["url"] = name
            page.goto(f"{base}/{name}", wait_until="load")
            found = _checked(page, name)
            problems += [f"{name}: broken image {src}" for src in found["broken_images"]]
            problems += [f"{name}: empty {table}" for table in found["empty_tables"]]
        browser.close()
    return pages, problems


def test_every_page_opens_without_errors_broken_images_or_empty_tables(smoke_book):
    if CHROMIUM is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium; .ci/run installs it in CI)")
    pages, problems = browser_problems(smoke_book.index.parent, CHROMIUM)
    assert "index.html" in pages and any(p.startswith("runs/quantization/") for p in pages)
    assert not problems, "\n".join(problems)
