"""Load a report page in headless Chromium: its DOM as the browser parsed it, and a screenshot.

Used to check ``report.html`` the way a reader sees it (the tests, ``benchmarks/demo.py``).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

# Tried in turn on PATH.
BROWSERS = ("chromium", "chromium-browser", "google-chrome")

# Headless; no sandbox, since Chromium will not start sandboxed as root and containers often
# lack the namespaces it needs; nothing that reaches the network: a report page is
# self-contained.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)

TIMEOUT_S = 120  # a first start on a busy 2-core host takes seconds, never minutes


def find_chromium() -> str | None:
    """The path of the first of ``BROWSERS`` on PATH, or None."""
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def load_page(
    page: Path,
    *,
    screenshot: Path | None = None,
    width: int = 1400,
    height: int = 2600,
) -> str:
    """Load ``page`` in headless Chromium and return its DOM after loading, serialized.

    Args:
        page: the HTML file.
        screenshot: where to write a PNG of the window; none when omitted.
        width: the window's width in pixels.
        height: the window's height in pixels (the screenshot is cut there).

    Returns:
        The DOM as HTML text.

    Raises:
        FileNotFoundError: no Chromium is installed (``apt-get install chromium``), or it
            wrote no screenshot.
        subprocess.CalledProcessError: Chromium failed (its stderr is attached).
    """
    browser = find_chromium()
    if browser is None:
        raise FileNotFoundError(
            f"no Chromium on PATH (looked for {', '.join(BROWSERS)}): apt-get install chromium"
        )
    shot = [f"--screenshot={Path(screenshot).resolve()}"] if screenshot is not None else []
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run(
            [
                browser,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={profile}",
                f"--window-size={width},{height}",
                *shot,
                "--dump-dom",
                Path(page).resolve().as_uri(),
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
    if screenshot is not None and not Path(screenshot).is_file():
        raise FileNotFoundError(f"{browser} wrote no screenshot to {screenshot}")
    return result.stdout


def screenshot(page: Path, png: Path, width: int = 1400, height: int = 2600) -> Path:
    """A headless Chromium screenshot of ``page`` in a ``width`` x ``height`` window.

    Returns:
        ``png``.

    Raises:
        FileNotFoundError: no Chromium is installed (``apt-get install chromium``).
        subprocess.CalledProcessError: Chromium failed.
    """
    load_page(page, screenshot=png, width=width, height=height)
    return Path(png)
