"""mkdocs hook: the site typesets its equations with KaTeX served from its own assets.

``pymdownx.arithmatex`` (``generic: true``) wraps every equation in ``<span class="arithmatex">\\(...\\)``;
``docs/javascripts/katex.js`` renders those spans on every page (Material for MkDocs' documented
KaTeX setup). KaTeX itself is the release pinned below, taken from the npm registry when the site is built
(the tarball's sha512 checked against the pin), kept in a cache folder and copied under
``site/assets/katex/`` — nothing minified is committed, and the built site works offline.

``SEQZOO_KATEX_CACHE`` sets the cache folder (default ``~/.cache/seqzoo/katex``); a folder already holding
the unpacked release is used as it is, so a machine without network builds from a copied cache.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import shutil
import tarfile
import urllib.request
from pathlib import Path

from mkdocs.exceptions import PluginError

VERSION = "0.16.47"
INTEGRITY = "sha512-Eeo8Ys1doU1z+x8AZsPpQu+p/QcZBI5PeOo7QGQdy2x2m0MU/hYagBbGOmXwr5KVbEfVuWv9LpnQWeehogurjg=="
URL = f"https://registry.npmjs.org/katex/-/katex-{VERSION}.tgz"
#: what the site needs of the release: the script, the stylesheet, its fonts, the auto-render extension
NEEDED = ("katex.min.js", "katex.min.css", "contrib/auto-render.min.js", "fonts")


def _cache() -> Path:
    root = Path(os.environ.get("SEQZOO_KATEX_CACHE", Path.home() / ".cache" / "seqzoo" / "katex"))
    return root / VERSION


def _fetch(dest: Path) -> None:
    try:
        blob = urllib.request.urlopen(URL, timeout=60).read()  # noqa: S310 - a fixed https URL
    except OSError as err:
        raise PluginError(
            f"KaTeX {VERSION} is not in {dest} and {URL} cannot be read ({err}); build once with network, or "
            "copy an unpacked katex/dist folder there (SEQZOO_KATEX_CACHE sets the cache)"
        ) from None
    got = "sha512-" + base64.b64encode(hashlib.sha512(blob).digest()).decode()
    if got != INTEGRITY:
        raise PluginError(f"KaTeX {VERSION} from {URL} has integrity {got}, expected the pinned {INTEGRITY}")
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        for member in tar.getmembers():
            if not member.isfile() or not member.name.startswith("package/dist/"):
                continue
            rel = member.name[len("package/dist/"):]
            if not any(rel == n or rel.startswith(n + "/") for n in NEEDED):
                continue
            out = tmp / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(tar.extractfile(member).read())
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def katex_dir() -> Path:
    """The unpacked release, fetched on first use."""
    dest = _cache()
    if not all((dest / n).exists() for n in NEEDED):
        dest.parent.mkdir(parents=True, exist_ok=True)
        _fetch(dest)
    return dest


def on_config(config):
    katex_dir()  # fail the build early, with the reason, when KaTeX cannot be had
    return config


def on_post_build(config):
    target = Path(config["site_dir"]) / "assets" / "katex"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(katex_dir(), target)
