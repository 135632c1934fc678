"""Driving a real headless Chromium from pytest (Playwright's sync API, the system browser).

Setup (Debian; as root, or prefix sudo):

    apt-get update && apt-get install -y chromium
    pip install playwright            # no ``playwright install``: we use /usr/bin/chromium

Use from a test module::

    import browser_support

    pytestmark = browser_support.requires_browser
    browser = browser_support.browser              # the fixtures, taken into the module
    browser_page = browser_support.browser_page

    def test_something(browser_page):
        browser_page.goto(url)

Tests are skipped, with the reason, when Chromium or the playwright package is missing.
Set ``CHROMIUM_PATH`` to use another Chromium/Chrome executable.
"""

from __future__ import annotations

import importlib.util
import os
import shutil

import pytest

# Playwright already passes --no-sandbox (chromium_sandbox=False) and --headless; they are
# spelled out so the launch does not depend on those defaults. --no-sandbox is what running
# as root in a container needs; --disable-dev-shm-usage avoids crashes where /dev/shm is
# small (Docker's default is 64 MiB).
LAUNCH_ARGS = ["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"]

_CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome")


def chromium_path() -> str | None:
    """The Chromium executable to drive, or None when there is none."""
    env = os.environ.get("CHROMIUM_PATH")
    if env:
        return env if os.access(env, os.X_OK) else None
    for name in _CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def playwright_available() -> bool:
    try:
        return importlib.util.find_spec("playwright.sync_api") is not None
    except (ImportError, ValueError):
        return False


def skip_reason() -> str | None:
    """Why browser tests cannot run here, or None when they can."""
    missing = []
    if not playwright_available():
        missing.append("the playwright package (pip install playwright)")
    if chromium_path() is None:
        missing.append("Chromium (apt-get install -y chromium, or set CHROMIUM_PATH)")
    if missing:
        return "browser test needs " + " and ".join(missing)
    return None


requires_browser = pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")


def launch(playwright, **kwargs):
    """A headless Browser on the system Chromium, with the arguments a root container needs."""
    exe = chromium_path()
    if exe is None:
        raise RuntimeError(skip_reason())
    args = list(LAUNCH_ARGS) + list(kwargs.pop("args", []))
    kwargs.setdefault("headless", True)
    kwargs.setdefault("timeout", 30_000)
    return playwright.chromium.launch(
        executable_path=exe, args=args, chromium_sandbox=False, **kwargs
    )


@pytest.fixture(scope="module")
def browser():
    """One Chromium per test module (starting it takes about a second)."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = launch(p)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def browser_page(browser):
    """A fresh page in its own context (no shared cookies/storage); actions time out in 8 s."""
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(8_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.js_errors = errors  # uncaught exceptions thrown by the page's scripts
    try:
        yield page
    finally:
        context.close()
