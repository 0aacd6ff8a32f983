"""Screenshots of documentation pages: build the site, serve it on localhost, and shoot each page with Chromium.

    .venv/bin/python docs/screenshots.py --out /tmp/shots / reference/python-api/

A development tool for checking how pages render (styles, fonts, code blocks), not part of the tests.
It needs the `docs` extra and a Chromium binary (Debian: `apt-get install chromium`).
"""

from __future__ import annotations

import argparse
import functools
import http.server
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"


def build_site(site_dir: Path) -> None:
    """Build the site strictly into `site_dir` (a broken link or docstring stops here, with mkdocs' output)."""
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site_dir)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"mkdocs build failed (exit {done.returncode}):\n{done.stdout}{done.stderr}")


def shot_name(page: str) -> str:
    """A PNG file name for a page path: '/' -> index.png, 'reference/python-api/' -> reference-python-api.png."""
    stem = page.strip("/").removesuffix("index.html").strip("/").replace("/", "-")
    return f"{stem or 'index'}.png"


def screenshot(url: str, out: Path, size: str) -> None:
    """Shoot `url` into `out` with headless Chromium, in a profile of its own that is deleted afterwards."""
    # Every background service Chromium would reach out to is off: the page under test is the only traffic.
    with tempfile.TemporaryDirectory(prefix="fedpeft-chromium-") as profile:
        cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", f"--window-size={size}", f"--screenshot={out}", url]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0 or not out.is_file():
        raise SystemExit(f"chromium could not shoot {url} (exit {done.returncode}):\n{done.stderr[-2000:]}")


def main(argv: list[str] | None = None) -> int:
    """Build, serve and shoot the pages named on the command line; print each PNG's path."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pages", nargs="+", help="page paths under the site root, e.g. / or reference/python-api/")
    ap.add_argument("--out", type=Path, default=Path("screenshots"), help="folder for the PNGs (made if missing)")
    ap.add_argument("--size", default="1280,1600", help="window size, WIDTH,HEIGHT")
    args = ap.parse_args(argv)
    if not Path(CHROMIUM).is_file():
        raise SystemExit(f"{CHROMIUM} not found: install Chromium (Debian: apt-get install chromium)")
    args.out.mkdir(parents=True, exist_ok=True)
    site = Path(tempfile.mkdtemp(prefix="fedpeft-site-"))
    try:
        build_site(site)
        handler = functools.partial(_QuietHandler, directory=str(site))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)  # port 0: a free one
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            base = f"http://127.0.0.1:{server.server_address[1]}/"
            for page in args.pages:
                out = args.out.resolve() / shot_name(page)
                screenshot(base + page.lstrip("/"), out, args.size)
                print(out)
        finally:
            server.shutdown()
            server.server_close()
            thread.join()
    finally:
        shutil.rmtree(site, ignore_errors=True)
    return 0


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the built site without a log line per request."""

    def log_message(self, format: str, *args: object) -> None:
        pass


if __name__ == "__main__":
    sys.exit(main())
