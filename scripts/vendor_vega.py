"""Write infra/vega/template.html: DVC's plot page with Vega, Vega-Lite and vega-embed inline.

DVC's own page loads those three scripts from a CDN, so `dvc plots show` drew blank plots on a
machine without internet. `.dvc/config` points `plots.html_template` at the page this writes;
the scripts are inlined (not linked) so the page works wherever `dvc plots show -o` puts it.

    python scripts/vendor_vega.py                  # npm pack the pinned versions, then write
    python scripts/vendor_vega.py --from DIR       # use vega-*.tgz already in DIR

All three are BSD-3-Clause (University of Washington Interactive Data Lab); their licence texts
go to infra/vega/LICENSES/. The major versions are the ones DVC's templates are written for
(Vega 5, Vega-Lite 5, vega-embed 6).
"""

from __future__ import annotations

import argparse
import subprocess
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "infra" / "vega"
PACKAGES = {  # npm name -> (version, the browser build inside the package)
    "vega": ("5.33.1", "build/vega.min.js"),
    "vega-lite": ("5.23.0", "build/vega-lite.min.js"),
    "vega-embed": ("6.29.0", "build/vega-embed.min.js"),
}
# DVC fills these (dvc_render.html.HTML): without `{scripts}` it adds no CDN tags.
PLOTS_PLACEHOLDER = "{plot_divs}"
REFRESH_PLACEHOLDER = "{refresh_tag}"

PAGE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    {refresh_tag}
    <title>DVC Plot</title>
    <!-- Written by scripts/vendor_vega.py: {versions}, inline (BSD-3-Clause, see
         infra/vega/LICENSES). No script is fetched from the network. -->
{inline}
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def _read_member(archive: Path, name: str) -> str | None:
    with tarfile.open(archive) as tar:
        try:
            member = tar.extractfile(f"package/{name}")
        except KeyError:
            return None
        return None if member is None else member.read().decode("utf-8")


def _licence(tarballs: dict[str, Path], name: str) -> str:
    """The package's LICENSE; vega's npm package ships none (its package.json says
    BSD-3-Clause): the Vega project's licence is the same UW IDL text as vega-lite's."""
    text = _read_member(tarballs[name], "LICENSE")
    if text is not None:
        return text
    sibling = _read_member(tarballs["vega-lite"], "LICENSE") or ""
    return (
        f"The {name} npm package ships no LICENSE file; its package.json declares BSD-3-Clause.\n"
        "The Vega project's licence (https://github.com/vega/vega/blob/main/LICENSE) is the\n"
        "University of Washington Interactive Data Lab BSD-3-Clause licence, as for Vega-Lite:\n\n"
        + sibling
    )


def _script(source: str, label: str) -> str:
    """One inline <script>; refuses code that would end the element or hit DVC's placeholders."""
    for bad in ("</script", PLOTS_PLACEHOLDER, REFRESH_PLACEHOLDER, "{scripts}"):
        if bad in source.lower():
            raise ValueError(f"{label} contains {bad!r}: it cannot be inlined as is")
    return f'    <script type="text/javascript">/* {label} */\n{source}\n    </script>'


def archives(folder: Path | None, work: Path) -> dict[str, Path]:
    """npm name -> its tarball: from `folder`, else `npm pack` of the pinned versions."""
    found: dict[str, Path] = {}
    for name, (version, _) in PACKAGES.items():
        tgz = f"{name}-{version}.tgz"
        if folder is not None:
            found[name] = folder / tgz
        else:
            subprocess.run(["npm", "pack", f"{name}@{version}"], cwd=work, check=True)
            found[name] = work / tgz
    return found


def write_template(tarballs: dict[str, Path], out: Path = OUT) -> Path:
    (out / "LICENSES").mkdir(parents=True, exist_ok=True)
    inline = []
    for name, (version, build) in PACKAGES.items():
        source = _read_member(tarballs[name], build)
        if source is None:
            raise FileNotFoundError(f"{tarballs[name]} has no package/{build}")
        # A source map link would send the browser's developer tools to the network.
        kept = [ln for ln in source.splitlines() if not ln.startswith("//# sourceMappingURL=")]
        inline.append(_script("\n".join(kept), f"{name} {version}"))
        (out / "LICENSES" / f"{name}.txt").write_text(_licence(tarballs, name))
    versions = ", ".join(f"{n} {v}" for n, (v, _) in PACKAGES.items())
    page = PAGE.format(
        refresh_tag=REFRESH_PLACEHOLDER,
        plot_divs=PLOTS_PLACEHOLDER,
        versions=versions,
        inline="\n".join(inline),
    )
    path = out / "template.html"
    path.write_text(page)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="folder", type=Path, help="folder with the npm tarballs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        path = write_template(archives(args.folder, Path(work)))
    print(f"wrote {path.relative_to(REPO)} ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
