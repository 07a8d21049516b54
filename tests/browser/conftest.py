"""Browser tests: Debian's headless Chromium, driven by Playwright, against a live local stack.

One LiveStack (real servers, real service processes) per test module and one Chromium per
session; every test gets a fresh browser context (cookies), and a screenshot of each of its pages
is saved to ``tests/browser/artifacts/`` when it fails.
"""

from __future__ import annotations

import os
import re
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, Playwright, sync_playwright

#: Chromium from Debian (``playwright install`` cannot download browsers on these machines).
CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
#: Flags for Chromium as root in a container, without background chatter.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
#: Where screenshots of failed tests go (gitignored).
ARTIFACTS = Path(__file__).parent / "artifacts"
#: Browser window size (pixels).
VIEWPORT = {"width": 1280, "height": 800}
#: Longest wait for one page action or assertion (milliseconds).
ACTION_TIMEOUT_MS = 15_000

_FAILED = pytest.StashKey[bool]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "browser: drives headless Chromium against a live stack")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed:
        item.stash[_FAILED] = True
    return report


@pytest.fixture(scope="session")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="session")
def chromium(playwright: Playwright) -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} not found: install Debian's chromium (apt-get install chromium)")
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    try:
        yield browser
    finally:
        browser.close()


@pytest.fixture
def context(chromium: Browser, request: pytest.FixtureRequest) -> Iterator[BrowserContext]:
    context = chromium.new_context(viewport=VIEWPORT, accept_downloads=True)  # type: ignore[arg-type]
    context.set_default_timeout(ACTION_TIMEOUT_MS)
    try:
        yield context
    finally:
        if request.node.stash.get(_FAILED, False):
            ARTIFACTS.mkdir(exist_ok=True)
            name = re.sub(r"[^\w.-]+", "_", request.node.name)
            for number, page in enumerate(context.pages):
                page.screenshot(path=str(ARTIFACTS / f"{name}-{number}.png"), full_page=True)
        context.close()


@pytest.fixture
def page(context: BrowserContext) -> Page:
    return context.new_page()
