"""The documentation site's build, without a browser: every page with equations loads the KaTeX renderer
from the site's own assets, the API reference is generated, and the KaTeX fetch checks its pin.
(``tools/check_docs_site.py`` checks the rendered pages in headless Chromium; CI runs it.)"""

import importlib.util
import io
import re
import tarfile
from pathlib import Path

import pytest

mkdocs = pytest.importorskip("mkdocs")
ROOT = Path(__file__).resolve().parent.parent


def _hook():
    spec = importlib.util.spec_from_file_location("katex_hook", ROOT / "docs" / "hooks" / "katex.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The site built as ``mkdocs build`` does, with stand-in KaTeX files in the cache (no network here)."""
    from mkdocs.commands.build import build
    from mkdocs.config import load_config

    tmp = tmp_path_factory.mktemp("docs")
    hook = _hook()
    cache = tmp / "katex" / hook.VERSION
    for name in hook.NEEDED:
        path = cache / name / "KaTeX_Main-Regular.woff2" if name == "fonts" else cache / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("/* stand-in */")
    mp = pytest.MonkeyPatch()
    mp.setenv("SEQZOO_KATEX_CACHE", str(tmp / "katex"))
    try:
        build(load_config(str(ROOT / "mkdocs.yml"), site_dir=str(tmp / "site")))
    finally:
        mp.undo()
    return tmp / "site"


def test_every_page_with_equations_loads_the_renderer(site):
    pages = sorted(site.rglob("index.html"))
    with_math = [p for p in pages if 'class="arithmatex"' in p.read_text(encoding="utf-8")]
    assert len(with_math) >= 7  # concepts, the learner pages, every layer page
    for page in with_math:
        html = page.read_text(encoding="utf-8")
        scripts = re.findall(r'<script src="([^"]+)"', html)
        for want in ("javascripts/katex.js", "assets/katex/katex.min.js", "assets/katex/contrib/auto-render.min.js"):
            assert any(s.endswith(want) for s in scripts), (page, want)
        assert re.search(r'<link[^>]+href="[^"]*assets/katex/katex\.min\.css"', html), page
        assert "cdn.jsdelivr" not in html and "unpkg.com" not in html  # served by the site itself
    assert (site / "assets" / "katex" / "katex.min.js").is_file()
    assert (site / "assets" / "katex" / "fonts").is_dir()


def test_the_api_reference_is_generated_from_docstrings(site):
    api = site / "api"
    seqzoo_page = (api / "seqzoo" / "index.html").read_text(encoding="utf-8")
    for anchor in ("seqzoo.create_layer", "seqzoo.list_layers", "seqzoo.create_model", "seqzoo.SequenceLayer",
                   "seqzoo.SequenceLayer.check_input", "seqzoo.Learner", "seqzoo.GradientLearner",
                   "seqzoo.GradientLearner.init_outer_params", "seqzoo.hookimpl"):
        assert f'id="{anchor}"' in seqzoo_page, anchor
    assert 'id="seqzoo.testing.check_layer"' in (api / "testing" / "index.html").read_text(encoding="utf-8")
    assert "from_ttt_lm_pytorch" in (api / "interop" / "index.html").read_text(encoding="utf-8")
    assert 'id="seqzoo.backbones.LanguageModel"' in (api / "backbones" / "index.html").read_text(encoding="utf-8")
    assert 'id="seqzoo.hf.SeqzooForCausalLM"' in (api / "hf" / "index.html").read_text(encoding="utf-8")
    # the check_layer docstring's text, not only its name
    assert "conformance" in (api / "testing" / "index.html").read_text(encoding="utf-8")


def _tarball(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_katex_is_taken_only_with_its_pinned_integrity(tmp_path, monkeypatch):
    from mkdocs.exceptions import PluginError

    hook = _hook()
    blob = _tarball({"package/dist/katex.min.js": b"x", "package/dist/katex.min.css": b"y",
                     "package/dist/contrib/auto-render.min.js": b"z", "package/dist/fonts/a.woff2": b"f",
                     "package/dist/katex.mjs": b"unused"})

    class Response:
        def read(self):
            return blob

    monkeypatch.setenv("SEQZOO_KATEX_CACHE", str(tmp_path))
    monkeypatch.setattr(hook.urllib.request, "urlopen", lambda url, timeout: Response())
    with pytest.raises(PluginError, match="expected the pinned"):
        hook.katex_dir()
    assert not (tmp_path / hook.VERSION).exists()
    # the same tarball under its own integrity unpacks what the site needs, and nothing else
    import base64
    import hashlib

    monkeypatch.setattr(hook, "INTEGRITY", "sha512-" + base64.b64encode(hashlib.sha512(blob).digest()).decode())
    out = hook.katex_dir()
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == \
        ["contrib/auto-render.min.js", "fonts/a.woff2", "katex.min.css", "katex.min.js"]

    def offline(url, timeout):
        raise OSError("no network")

    monkeypatch.setenv("SEQZOO_KATEX_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(hook.urllib.request, "urlopen", offline)
    with pytest.raises(PluginError, match="cannot be read"):
        hook.katex_dir()
