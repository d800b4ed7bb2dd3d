"""Browser tests: Playwright for Python driving Debian's Chromium (``/usr/bin/chromium``,
installed by ``.ci/run``; Playwright's own browser download is not used).

Every request a page makes is recorded (``Recorder``) and any request to another host
than the service under test is refused before it leaves the browser, so a page that
would need the internet fails here as it would on an offline factory network.
Screenshots go to ``tmp_path``, or to ``$FEDINSPECT_SCREENSHOT_DIR`` when set
(``FEDINSPECT_SCREENSHOT_DIR=docs`` refreshes the README's pictures).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from PIL import Image
from playwright.sync_api import Browser, BrowserContext, Page, Route, expect, sync_playwright

from tests.factories import make_image_folder

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
#: bounded waits for pages and real processes (a tiny cycle takes seconds to a minute)
PAGE_TIMEOUT_MS = 30_000
CYCLE_TIMEOUT_MS = 240_000

expect.set_options(timeout=PAGE_TIMEOUT_MS)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    # one module at a time: Playwright's sync API keeps an event loop running in this
    # thread while it is open, and tests after it that call asyncio.run() need none
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: apt-get install chromium"
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@dataclass
class Recorder:
    """Every URL the pages of a browser context asked for; only ``allowed`` hosts
    (host:port) are let through, the others refused and kept in ``refused``."""

    allowed: set[str]
    urls: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)

    def route(self, route: Route) -> None:
        url = route.request.url
        self.urls.append(url)
        parts = urlsplit(url)
        if parts.scheme in ("data", "blob") or parts.netloc in self.allowed:
            route.continue_()
        else:
            self.refused.append(url)
            route.abort()

    def other_hosts(self) -> list[str]:
        return [
            u
            for u in self.urls
            if urlsplit(u).scheme not in ("data", "blob") and urlsplit(u).netloc not in self.allowed
        ]


@pytest.fixture
def recorder() -> Recorder:
    return Recorder(allowed=set())


@pytest.fixture
def context(browser: Browser, recorder: Recorder) -> Iterator[BrowserContext]:
    ctx = browser.new_context(viewport={"width": 1280, "height": 900}, service_workers="block")
    ctx.set_default_timeout(PAGE_TIMEOUT_MS)
    ctx.route("**/*", recorder.route)
    try:
        yield ctx
    finally:
        ctx.close()


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 tiny grey PNGs in two classes (dark, bright) at 32 px."""
    return make_image_folder(
        tmp_path_factory.mktemp("browser-images"), per_class=20, size=32, classes=("dark", "bright")
    )


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    target = Path(os.environ.get("FEDINSPECT_SCREENSHOT_DIR") or tmp_path)
    target.mkdir(parents=True, exist_ok=True)
    return target


def screenshot(page: Page, path: Path) -> Image.Image:
    """A small PNG of the page (a 64-colour palette keeps it to tens of KB); the
    image is returned so that the test can check it is not blank."""
    image = Image.open(io.BytesIO(page.screenshot(full_page=True))).convert("RGB")
    if image.height > 1800:
        image = image.crop((0, 0, image.width, 1800))
    small = image.resize((image.width * 3 // 4, image.height * 3 // 4), Image.Resampling.LANCZOS)
    small.quantize(colors=64, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    return image


def not_blank(image: Image.Image) -> bool:
    colours = image.convert("L").getcolors(maxcolors=256 * 256) or []
    return len(colours) > 8
