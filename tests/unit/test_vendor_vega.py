"""scripts/vendor_vega.py: DVC's plot page with the Vega scripts inline, never a network link,
and the committed page is one it would write (DVC's placeholders, no `{scripts}` for CDN tags)."""

from __future__ import annotations

import importlib.util
import io
import re
import tarfile
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]


def vendor() -> ModuleType:
    spec = importlib.util.spec_from_file_location("vendor_vega", REPO / "scripts/vendor_vega.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def npm_tarball(folder: Path, name: str, version: str, files: dict[str, str]) -> Path:
    """A tarball laid out like `npm pack` writes it (everything under package/)."""
    path = folder / f"{name}-{version}.tgz"
    with tarfile.open(path, "w:gz") as tar:
        for rel, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"package/{rel}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def tarballs(folder: Path, module: ModuleType, vega_js: str = "var vega = 1;") -> dict[str, Path]:
    out = {}
    for name, (version, build) in module.PACKAGES.items():
        files = {build: vega_js if name == "vega" else f"var x = '{name}';"}
        files[build] += "\n//# sourceMappingURL=x.min.js.map"
        if name != "vega":  # vega's npm package ships no LICENSE file
            files["LICENSE"] = f"BSD-3-Clause text of {name}"
        out[name] = npm_tarball(folder, name, version, files)
    return out


def test_page_inlines_every_script_and_links_nothing(tmp_path: Path) -> None:
    module = vendor()
    page = module.write_template(tarballs(tmp_path, module), tmp_path / "out").read_text()
    assert "{plot_divs}" in page and "{refresh_tag}" in page
    assert "{scripts}" not in page  # DVC would put its CDN <script src> tags there
    assert not re.search(r"<script[^>]*\bsrc=", page) and "sourceMappingURL" not in page
    assert "var vega = 1;" in page and "var x = 'vega-embed';" in page
    licences = sorted(p.name for p in (tmp_path / "out" / "LICENSES").iterdir())
    assert licences == ["vega-embed.txt", "vega-lite.txt", "vega.txt"]
    vega_licence = (tmp_path / "out" / "LICENSES" / "vega.txt").read_text()
    assert "BSD-3-Clause" in vega_licence and "vega-lite" in vega_licence


def test_code_that_would_end_the_script_element_is_refused(tmp_path: Path) -> None:
    module = vendor()
    bad = tarballs(tmp_path, module, vega_js="document.write('</script>');")
    with pytest.raises(ValueError, match="cannot be inlined"):
        module.write_template(bad, tmp_path / "out")


def test_the_committed_page_is_what_dvc_is_configured_to_use() -> None:
    config = (REPO / ".dvc" / "config").read_text()
    assert "html_template = ../infra/vega/template.html" in config
    page = (REPO / "infra" / "vega" / "template.html").read_text()
    assert "{plot_divs}" in page and "{scripts}" not in page
    assert not re.search(r"<script[^>]*\bsrc=", page)
    for name, (version, _) in vendor().PACKAGES.items():
        assert f"/* {name} {version} */" in page
