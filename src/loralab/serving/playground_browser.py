"""Headless Chromium for the playground's browser tests and its README screenshot: Debian's
``chromium`` driven by Playwright (``pip install playwright``; no ``playwright install``, nothing
downloaded), with a fresh profile and no background traffic."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


@contextmanager
def chromium_context(profile_dir: Path, width: int = 1280, height: int = 900) -> Iterator[Any]:
    """A Playwright browser context of the system Chromium on a fresh ``profile_dir``."""
    binary = shutil.which("chromium")
    if binary is None:
        raise FileNotFoundError("no `chromium` on PATH: apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile_dir),
            executable_path=binary,
            args=list(CHROMIUM_ARGS),
            headless=True,
            viewport={"width": width, "height": height},
        )
        try:
            yield context
        finally:
            context.close()
