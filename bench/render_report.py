"""Render a `rankwise report` page with headless Chromium and save a screenshot to look at.

    python bench/render_report.py R --out R-screenshot.png [--width 1200 --height 6000]

Needs Debian's `chromium` (apt-get install chromium). The page must render offline: Chromium
runs with networking off and reads the file through a file:// URL.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path


def screenshot(index: Path, out: Path, width: int, height: int) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        sys.exit("chromium not found: apt-get install chromium")
    command = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--proxy-server=127.0.0.1:9",
        "--proxy-bypass-list=<-loopback>",  # nothing from the net
        f"--window-size={width},{height}",
        f"--screenshot={out.resolve()}",
        index.resolve().as_uri(),
    ]
    subprocess.run(command, check=True, capture_output=True, timeout=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="report directory (holds index.html)")
    parser.add_argument("--out", type=Path, required=True, help="screenshot PNG")
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=6000)
    args = parser.parse_args()
    index = args.report / "index.html"
    if not index.is_file():
        sys.exit(f"no index.html in {args.report}")
    screenshot(index, args.out, args.width, args.height)
    print(f"screenshot: {args.out}")


if __name__ == "__main__":
    main()
