"""Check an HTML report the way a reader sees it: statically, and in headless Chromium.

    python -m eval.browser_check runs/eval/report.html --screenshot runs/eval/report.png

The static check needs nothing: every image is an embedded data URI that decodes, every link
points at an anchor of the page, nothing is loaded from outside. The browser check opens the
page in headless Chromium (Debian package ``chromium``), counts images that failed to load and
links that go nowhere after the page's load event, and takes a full-page screenshot.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
MAX_SCREENSHOT_HEIGHT = 16000
# Runs after the load event; the result is written into the DOM, which --dump-dom prints.
_PROBE = """<script>
window.addEventListener("load", () => {
  const images = [...document.images];
  const broken = images.filter((i) => !(i.complete && i.naturalWidth > 0)).map((i) => i.alt || i.src.slice(0, 80));
  const links = [...document.querySelectorAll("a[href]")].map((a) => a.getAttribute("href"));
  const deadLinks = links.filter((h) => !(h.startsWith("#") && document.getElementById(decodeURIComponent(h.slice(1)))));
  const external = [...document.querySelectorAll("[src], link[href]")].map((e) => e.getAttribute("src") || e.getAttribute("href")).filter((u) => !u.startsWith("data:"));
  const out = document.createElement("pre");
  out.id = "__report_check";
  out.textContent = JSON.stringify({images: images.length, broken, links: links.length, deadLinks, external, height: document.documentElement.scrollHeight});
  document.body.appendChild(out);
});
</script>"""


@dataclass
class CheckResult:
    """What a check found; ``problems`` is empty when the page is fine."""

    images: int = 0
    links: int = 0
    problems: list[str] = field(default_factory=list)
    screenshot: str | None = None
    height: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.images, self.hrefs, self.sources = set(), [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "img":
            self.images.append(attrs.get("src") or "")
        elif tag == "a" and "href" in attrs:
            self.hrefs.append(attrs["href"] or "")
        elif tag in ("script", "link", "iframe", "source", "video", "audio") and (attrs.get("src") or attrs.get("href")):
            self.sources.append(attrs.get("src") or attrs.get("href"))


def static_check(report: str | os.PathLike) -> CheckResult:
    """Images embedded and decodable, links internal and resolving, no outside resources."""
    from PIL import Image

    collector = _Collector()
    collector.feed(Path(report).read_text(encoding="utf-8"))
    result = CheckResult(images=len(collector.images), links=len(collector.hrefs))
    for i, src in enumerate(collector.images):
        match = re.match(r"data:image/[a-z+]+;base64,(.*)$", src, re.DOTALL)
        if not match:
            result.problems.append(f"image {i} is not embedded: {src[:80]!r}")
            continue
        try:
            with Image.open(io.BytesIO(base64.b64decode(match.group(1), validate=True))) as image:
                image.verify()
        except (binascii.Error, ValueError, OSError) as exc:
            result.problems.append(f"image {i} does not decode: {exc}")
    for href in collector.hrefs:
        if not href.startswith("#") or href[1:] not in collector.ids:
            result.problems.append(f"link {href!r} does not point at an anchor of the page")
    result.problems += [f"outside resource {src!r}" for src in collector.sources]
    return result


def find_browser() -> str | None:
    """``$SR_CHROMIUM`` or the first Chromium-family browser on PATH."""
    if os.environ.get("SR_CHROMIUM"):
        return os.environ["SR_CHROMIUM"]
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


def _chromium(browser: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
    # --no-sandbox: Chromium refuses to start as root with its sandbox (CI containers)
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run", "--mute-audio", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)


def browser_check(report: str | os.PathLike, screenshot: str | os.PathLike | None = None, browser: str | None = None, width: int = 1280, timeout: float = 120) -> CheckResult:
    """Load ``report`` in headless Chromium: images loaded, links resolve; optionally a full-page screenshot."""
    browser = browser or find_browser()
    if browser is None:
        raise FileNotFoundError(f"no headless browser found (looked for {', '.join(BROWSERS)}; set SR_CHROMIUM); on Debian: apt-get install chromium")
    report = Path(report).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        probed = Path(tmp) / report.name
        probed.write_text(report.read_text(encoding="utf-8").replace("</body>", _PROBE + "</body>", 1), encoding="utf-8")
        run = _chromium(browser, f"--window-size={width},900", "--virtual-time-budget=20000", f"--user-data-dir={tmp}/profile", "--dump-dom", probed.as_uri(), timeout=timeout)
    match = re.search(r'<pre id="__report_check">(.*?)</pre>', run.stdout, re.DOTALL)
    if not match:
        tail = (run.stderr.strip().splitlines() or ["no output"])[-1]
        return CheckResult(problems=[f"{browser} did not render {report} (exit {run.returncode}): {tail}"])
    found = json.loads(match.group(1).replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&"))
    result = CheckResult(images=found["images"], links=found["links"], height=int(found["height"]))
    result.problems += [f"image did not load in the browser: {name}" for name in found["broken"]]
    result.problems += [f"link goes nowhere in the browser: {href}" for href in found["deadLinks"]]
    result.problems += [f"outside resource in the browser: {src}" for src in found["external"]]
    if screenshot is not None:
        screenshot = Path(screenshot).resolve()
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        height = min(max(result.height, 600), MAX_SCREENSHOT_HEIGHT)
        with tempfile.TemporaryDirectory() as tmp:
            shot = _chromium(browser, f"--window-size={width},{height}", f"--user-data-dir={tmp}/profile", f"--screenshot={screenshot}", report.as_uri(), timeout=timeout)
        if not screenshot.is_file():
            result.problems.append(f"{browser} wrote no screenshot (exit {shot.returncode})")
        else:
            result.screenshot = str(screenshot)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.browser_check", description="Check an HTML report statically and in headless Chromium.")
    parser.add_argument("report")
    parser.add_argument("--screenshot", help="write a full-page PNG screenshot here")
    parser.add_argument("--static-only", action="store_true", help="skip the browser")
    args = parser.parse_args(argv)
    results = [("static", static_check(args.report))]
    if not args.static_only:
        results.append(("browser", browser_check(args.report, args.screenshot)))
    for name, result in results:
        print(f"{name}: {result.images} images, {result.links} links, {len(result.problems)} problems" + (f", screenshot {result.screenshot}" if result.screenshot else ""))
        for problem in result.problems:
            print(f"  {problem}")
    return 0 if all(r.ok for _, r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
