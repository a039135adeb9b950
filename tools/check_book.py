"""Open every page of the built book in headless Chromium and check it as a reader.

Serves book/_build/html on 127.0.0.1, drives Chromium through its DevTools
protocol, and fails (exit 1, naming page and problem) when a page:

- requests anything outside the site (a CDN script, a web font);
- fails to load something of its own (a 404, a broken image);
- leaves a formula unrendered (raw `\\(`, `\\[` or `$$` text, or a MathJax error);
- shows an error on the console;
- at 1280 px, shows a figure at less than 75% of its natural width, or a code
  block whose lines do not fit its box.

Usage:
    python -m tools.check_book [--html DIR] [--chromium PATH] [--screenshots DIR]
"""

from __future__ import annotations

import argparse
import base64
import functools
import http.server
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import websocket

ROOT = Path(__file__).resolve().parents[1]
WIDE = 1280  # px: a laptop's window, where figures and code are measured
NARROW = 400  # px: a phone, for screenshots
MIN_FIGURE_SCALE = 0.75  # a figure shown narrower than this is hard to read
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-port=0",
]

# Runs in the page once it has loaded and MathJax has typeset it.
MEASURE = """
(async () => {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    await MathJax.startup.promise;
  }
  await document.fonts.ready;
  // folded solutions and answers are measured too: a reader opens them
  for (const d of document.querySelectorAll("details")) d.open = true;
  const raw = [];
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  const skip = "PRE, CODE, SCRIPT, STYLE, TEXTAREA, MJX-CONTAINER, MJX-ASSISTIVE-MML";
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    const text = node.textContent;
    const tex = /\\\\\\(|\\\\\\[|\\$\\$|\\\\begin\\{/;
    if (tex.test(text) && !node.parentElement.closest(skip)) {
      raw.push(text.trim().slice(0, 80));
    }
  }
  for (const el of document.querySelectorAll("span.math, div.math")) {
    if (!el.querySelector("mjx-container")) {
      raw.push(el.textContent.trim().slice(0, 80));
    }
  }
  for (const el of document.querySelectorAll("mjx-merror")) {
    raw.push("MathJax error: " + el.textContent.slice(0, 80));
  }
  const images = [...document.images];
  const broken = images.filter(i => i.complete && i.naturalWidth === 0)
    .map(i => i.getAttribute("src"));
  const figures = images.filter(i => i.offsetParent !== null && i.naturalWidth > 0)
    .map(i => ({src: i.getAttribute("src"), natural: i.naturalWidth,
                shown: i.getBoundingClientRect().width, alt: i.getAttribute("alt")}));
  const code = [...document.querySelectorAll("div.highlight pre")]
    .filter(p => p.offsetParent !== null)
    .map(p => ({scroll: p.scrollWidth, client: p.clientWidth,
                line: p.textContent.split("\\n").reduce(
                  (a, b) => b.length > a.length ? b : a, "").slice(0, 100)}));
  return {raw, broken, figures, code, formulas: document.querySelectorAll(
    "mjx-container").length};
})()
"""


class Page:
    """One browser tab, driven through the DevTools protocol over a websocket."""

    def __init__(self, ws_url: str):
        self.ws = websocket.create_connection(ws_url, timeout=60, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(
            json.dumps({"id": self.next_id, "method": method, "params": params})
        )
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]
            self.events.append(message)

    def wait_for(self, method: str, timeout: float = 30) -> None:
        end = time.monotonic() + timeout
        while not any(e.get("method") == method for e in self.events):
            if time.monotonic() > end:
                raise TimeoutError(f"no {method} within {timeout} s")
            self.ws.settimeout(max(0.05, end - time.monotonic()))
            self.events.append(json.loads(self.ws.recv()))
        self.ws.settimeout(60)

    def drain(self, seconds: float) -> None:
        """Collects the events that arrive in the next `seconds`."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self.ws.settimeout(left)
            try:
                self.events.append(json.loads(self.ws.recv()))
            except websocket.WebSocketTimeoutException:
                break
        self.ws.settimeout(60)

    def evaluate(self, expression: str):
        result = self.call(
            "Runtime.evaluate",
            expression=expression,
            awaitPromise=True,
            returnByValue=True,
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"script failed: {result['exceptionDetails']}")
        return result["result"]["value"]

    def open(self, url: str, width: int) -> None:
        self.events.clear()
        self.call(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=900,
            deviceScaleFactor=1,
            mobile=width < 600,
        )
        self.call("Page.navigate", url=url)
        self.wait_for("Page.loadEventFired")

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))


def problems_of(page: Page, site: str, report: dict) -> list[str]:
    """What is wrong with the page just opened: its events and its measurements."""
    found = []
    urls = {}
    for event in page.events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Network.requestWillBeSent":
            url = params["request"]["url"]
            urls[params["requestId"]] = url
            if not url.startswith((site, "data:", "blob:", "about:")):
                found.append(f"requests a resource outside the site: {url}")
        elif (
            method == "Network.responseReceived" and params["response"]["status"] >= 400
        ):
            found.append(
                f"HTTP {params['response']['status']} for {params['response']['url']}"
            )
        elif method == "Network.loadingFailed" and not params.get("canceled"):
            url = urls.get(params["requestId"], "?")
            found.append(f"failed to load {url}: {params['errorText']}")
        elif method == "Runtime.consoleAPICalled" and params["type"] == "error":
            text = " ".join(
                str(a.get("value", a.get("description"))) for a in params["args"]
            )
            found.append(f"console error: {text[:200]}")
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            text = details.get("exception", {}).get("description", details["text"])
            found.append(f"uncaught exception: {text[:200]}")
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            found.append(f"console error: {params['entry']['text'][:200]}")
    found += [f"formula left unrendered: {text!r}" for text in report["raw"]]
    found += [f"image failed to load: {src}" for src in report["broken"]]
    for figure in report["figures"]:
        scale = figure["shown"] / figure["natural"]
        if scale < MIN_FIGURE_SCALE:
            found.append(
                f"figure shown at {scale:.0%} of its width ({figure['shown']:.0f} of"
                f" {figure['natural']} px): {figure['src']}"
            )
    for block in report["code"]:
        if block["scroll"] > block["client"] + 1:
            found.append(
                f"code cut off ({block['scroll']} px in a {block['client']} px box):"
                f" {block['line']!r}"
            )
    return found


def find_chromium(path: str | None) -> str | None:
    for name in [path] if path else ["chromium", "chromium-browser", "google-chrome"]:
        found = shutil.which(name)
        if found:
            return found
    return None


def start_chromium(chromium: str, profile: Path) -> tuple[subprocess.Popen, str]:
    """Starts headless Chromium; returns the process and the first tab's websocket."""
    process = subprocess.Popen(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    port_file = profile / "DevToolsActivePort"
    end = time.monotonic() + 30
    while not port_file.exists() or not port_file.read_text().strip():
        if process.poll() is not None or time.monotonic() > end:
            process.kill()
            raise RuntimeError(f"{chromium} did not start")
        time.sleep(0.1)
    port = port_file.read_text().split()[0]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list") as response:
        tabs = [t for t in json.load(response) if t["type"] == "page"]
    return process, tabs[0]["webSocketDebuggerUrl"]


def serve(html: Path) -> http.server.ThreadingHTTPServer:
    """Serves `html` on a free port of 127.0.0.1, quietly, in a thread."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(html))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--html", type=Path, default=ROOT / "book" / "_build" / "html")
    parser.add_argument("--chromium", help="the browser (default: chromium on PATH)")
    parser.add_argument(
        "--screenshots",
        type=Path,
        help="also save each page's first screen at 1280 and 400 px here",
    )
    args = parser.parse_args(argv)

    chromium = find_chromium(args.chromium)
    if chromium is None:
        print(
            "no Chromium found: install it (Debian/Ubuntu: apt-get install chromium)"
            " or pass --chromium PATH",
            file=sys.stderr,
        )
        return 2
    # the theme's templates under _static/ are not pages; index.html redirects
    pages = sorted(
        p.relative_to(args.html).as_posix()
        for p in args.html.rglob("*.html")
        if not p.relative_to(args.html).parts[0].startswith("_")
        and 'http-equiv="Refresh"' not in p.read_text()
    )
    if not pages:
        print(f"no pages in {args.html}: build the book first", file=sys.stderr)
        return 2
    if args.screenshots:
        args.screenshots.mkdir(parents=True, exist_ok=True)

    server = serve(args.html)
    site = f"http://127.0.0.1:{server.server_address[1]}/"
    start = time.monotonic()
    failures = 0
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        process, ws_url = start_chromium(chromium, Path(profile))
        try:
            page = Page(ws_url)
            for domain in ["Page", "Network", "Runtime", "Log"]:
                page.call(f"{domain}.enable")
            page.call("Network.setCacheDisabled", cacheDisabled=True)
            for name in pages:
                page.open(site + name, WIDE)
                report = page.evaluate(MEASURE)
                page.drain(0.2)
                problems = problems_of(page, site, report)
                shrunk = [f["shown"] / f["natural"] for f in report["figures"]]
                smallest = f", smallest figure at {min(shrunk):.0%}" if shrunk else ""
                print(
                    f"{name}: {report['formulas']} formulas, {len(report['figures'])}"
                    f" figures{smallest}, {len(report['code'])} code blocks"
                    + (f", {len(problems)} PROBLEMS" if problems else "")
                )
                for problem in problems:
                    print(f"  {problem}")
                failures += bool(problems)
                if args.screenshots:
                    stem = name.replace("/", "_").removesuffix(".html")
                    page.screenshot(args.screenshots / f"{stem}_{WIDE}.png")
                    page.open(site + name, NARROW)
                    page.evaluate(MEASURE)
                    page.screenshot(args.screenshots / f"{stem}_{NARROW}.png")
        finally:
            process.terminate()
            process.wait()
            server.shutdown()
    seconds = time.monotonic() - start
    print(f"{len(pages)} pages in {seconds:.0f} s: {failures} with problems")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
