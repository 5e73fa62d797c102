"""Check the documentation site as a reader sees it, in headless Chromium.

    python tools/check_docs_site.py [--site DIR] [--out docs-check]

builds the site (``mkdocs build --strict``, unless ``--site`` names a built one), serves it on localhost,
opens every page in Debian's ``chromium`` through ``chromium-driver`` (Selenium), and asserts what a reader
sees:

- on every page with equations, each one became KaTeX markup, none failed to parse, and no TeX delimiter
  (``\\(``, ``\\[``, ``$``) is left in the page's text (code blocks aside): an equation the Markdown
  broke (a ``|`` inside a table cell's math, say) shows up that way;
- every image loaded (``complete`` with a natural width);
- the navigation reaches every page of the site from the home page.

Screenshots of the home page and a layer page, and ``report.json`` (every page's counts), go to ``--out``.
Exit status 0 when every check holds, 1 otherwise.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urldefrag, urljoin

ROOT = Path(__file__).resolve().parent.parent

# what the page shows: counts of equations, rendered ones, KaTeX errors, raw delimiters left in the text,
# images that did not load, and the navigation's links
PROBE = r"""
const arith = document.querySelectorAll('.arithmatex');
const rendered = [...arith].filter(e => e.querySelector('.katex')).length;
const errors = document.querySelectorAll('.katex-error').length;
const raw = [];
const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT, {
  acceptNode(node) {
    const p = node.parentElement;
    if (!p || p.closest('pre, code, script, style, .katex, .md-search')) return NodeFilter.FILTER_REJECT;
    return NodeFilter.FILTER_ACCEPT;
  }
});
for (let n = walker.nextNode(); n; n = walker.nextNode()) {
  const t = n.textContent;
  for (const d of ['\\(', '\\)', '\\[', '\\]', '$']) {
    const i = t.indexOf(d);
    if (i >= 0) { raw.push(t.slice(Math.max(0, i - 30), i + 30)); break; }
  }
}
const images = [...document.images];
const broken = images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src);
const nav = [...document.querySelectorAll('nav.md-nav a.md-nav__link[href]')].map(a => a.href);
return {arith: arith.length, rendered, errors, raw: raw.slice(0, 5), images: images.length, broken, nav,
        title: document.title, url: location.href};
"""


def _build(site: Path) -> None:
    subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=ROOT,
                   check=True)


def _serve(site: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def _driver(chromium: str, chromedriver: str, profile: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1280,1600"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(chromedriver), options=opts)


def _pages(site: Path, base: str) -> list[str]:
    out = []
    for html in sorted(site.rglob("index.html")):
        rel = html.parent.relative_to(site).as_posix()
        out.append(base if rel == "." else f"{base}{rel}/")
    return out


def _look(driver, url: str, equations: int, timeout: float = 30.0) -> dict:
    """What the page shows once it holds the ``equations`` its built HTML has, all typeset (or the
    timeout passed: the counts then say what was missing)."""
    driver.get(url)
    deadline = time.monotonic() + timeout
    while True:  # the equations are typeset after the page loads
        seen = driver.execute_script(PROBE)
        if (seen["arith"] == equations and seen["rendered"] + seen["errors"] >= equations) \
                or time.monotonic() > deadline:
            return seen
        time.sleep(0.1)


def _built_equations(site: Path, rel: str) -> int:
    return (site / rel / "index.html").read_text(encoding="utf-8").count('class="arithmatex"')


def check(site: Path, out: Path, chromium: str, chromedriver: str) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    server, base = _serve(site)
    failures: list[str] = []
    report: dict = {"pages": {}}
    with tempfile.TemporaryDirectory() as profile:
        driver = _driver(chromium, chromedriver, profile)
        try:
            pages = _pages(site, base)
            linked: dict[str, set[str]] = {}
            for url in pages:
                built = _built_equations(site, url[len(base):])
                seen = _look(driver, url, built)
                rel = url[len(base):] or "/"
                report["pages"][rel] = {"built": built,
                                        **{k: seen[k] for k in ("arith", "rendered", "errors", "raw", "images", "broken")}}
                if seen["arith"] != built or seen["rendered"] != built or seen["errors"]:
                    failures.append(f"{rel} ({seen['title']!r}): {seen['rendered']} of the built page's {built} "
                                    f"equations typeset ({seen['arith']} in the page), {seen['errors']} KaTeX errors")
                if seen["raw"]:
                    failures.append(f"{rel}: raw TeX left in the text: {seen['raw']}")
                if seen["broken"]:
                    failures.append(f"{rel}: images that did not load: {seen['broken']}")
                linked[url] = {urldefrag(urljoin(url, h))[0] for h in seen["nav"]}
            # the navigation from the home page reaches every page
            reached, todo = {base}, [base]
            while todo:
                for nxt in linked.get(todo.pop(), ()):
                    if nxt.startswith(base) and nxt not in reached:
                        reached.add(nxt)
                        todo.append(nxt)
            unreached = sorted(p[len(base):] for p in pages if p not in reached)
            if unreached:
                failures.append(f"pages the navigation does not reach: {unreached}")
            report["unreached"] = unreached
            # what a reader sees first, and a page of equations
            driver.get(base)
            driver.save_screenshot(str(out / "home.png"))
            _look(driver, f"{base}layers/ttt/", _built_equations(site, "layers/ttt/"))
            driver.save_screenshot(str(out / "layer-ttt.png"))
        finally:
            driver.quit()
            server.shutdown()
    report["failures"] = failures
    report["equations"] = sum(p["arith"] for p in report["pages"].values())
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--site", type=Path, default=None, help="a built site (default: build one)")
    p.add_argument("--out", type=Path, default=Path("docs-check"), help="screenshots and report.json")
    p.add_argument("--chromium", default="/usr/bin/chromium")
    p.add_argument("--chromedriver", default="/usr/bin/chromedriver")
    args = p.parse_args(argv)
    for tool in (args.chromium, args.chromedriver):
        if not Path(tool).is_file():
            print(f"error: {tool} not found (Debian: apt-get install chromium chromium-driver)", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory() as tmp:
        site = args.site
        if site is None:
            site = Path(tmp) / "site"
            _build(site)
        report = check(site, args.out, args.chromium, args.chromedriver)
    pages = report["pages"]
    math_pages = [k for k, v in pages.items() if v["arith"]]
    print(f"{len(pages)} pages, {len(math_pages)} with equations ({report['equations']} equations), "
          f"{sum(v['images'] for v in pages.values())} images; screenshots and report.json in {args.out}")
    for line in report["failures"]:
        print(f"FAIL {line}")
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
