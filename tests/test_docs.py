"""The documentation site builds without a warning, and documents every public class and function."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr  # strict: a docstring or link warning fails
    return out


@pytest.mark.parametrize("package", ["rrcm_diffusers", "conan_st", "shared_dist"])
def test_every_public_name_is_documented(site, package):
    module = __import__(package)
    page = (site / "api" / package.replace("_", "-") / "index.html").read_text()
    anchors = set(re.findall(r'id="([\w.]+)"', page))
    public = [
        n
        for n in module.__all__
        if inspect.isclass(getattr(module, n)) or inspect.isfunction(getattr(module, n))
    ]
    missing = [n for n in public if not any(a.endswith("." + n) for a in anchors)]
    assert not missing, f"{package}: public names without an API entry: {missing}"


def test_results_pages_embed_their_plots(site):
    # plots are images on the pages, not code-formatted paths, and every one of them was copied
    pages = (ROOT / "docs" / "results").glob("*.md")
    text = "\n".join(p.read_text() for p in pages)
    assert "`docs/figures/" not in text
    for name in re.findall(r"\]\(\.\./figures/([\w.]+\.png)\)", text):
        assert (site / "figures" / name).is_file(), name


@pytest.mark.parametrize("package", ["rrcm-diffusers", "conan-st", "shared-dist"])
def test_package_readme_stands_alone_on_an_index(package):
    """A package page is read on the index, away from this repository: every link is absolute, the
    metadata carries Project-URLs, and the example block is one the test suite runs."""
    from tests.helpers import pyproject

    folder = ROOT / "packages" / package
    text = (folder / "README.md").read_text()
    relative = [link for link in re.findall(r"\]\(([^)]+)\)", text) if not link.startswith("https://")]
    assert not relative, f"{package}/README.md: relative links break on an index page: {relative}"
    urls = pyproject(package)["project"].get("urls", {})
    assert urls and all(u.startswith("https://") and len(label) <= 32 for label, u in urls.items()), urls
    from tests.readme_snippets import BLOCKS

    assert any(readme == folder / "README.md" for readme, _ in BLOCKS.values()), "example not run by a test"


def test_the_site_summary_says_what_results_md_says():
    """docs/results/index.md is RESULTS.md with links relative to docs/: edit both or neither."""
    results = (ROOT / "RESULTS.md").read_text().split("## Pages")[0]
    site = (ROOT / "docs" / "results" / "index.md").read_text().split("## Pages")[0]
    assert site == results.replace("](docs/results/", "](").replace("](docs/figures/", "](../figures/")


def test_every_documented_block_that_opens_a_process_group_closes_it():
    """A gloo group left open until exit aborted finished two-process runs of the shared-dist example
    (6 of 169; 0 of 139 closed: docs/results/shared-dist.md). A block users copy must close what it opens:
    ``init_process_group`` directly, or an ``Accelerator`` / a trainer under ``accelerate launch``
    (neither transformers nor sentence-transformers closes the trainer's)."""
    from tests.readme_snippets import PYTHON_BLOCK

    opens = ("init_process_group(", "Accelerator(", "SentenceTransformerTrainer(")
    closes = ("destroy_process_group()", "end_training()", ".end()")
    pages = [ROOT / "README.md", *ROOT.glob("packages/*/README.md"), *ROOT.glob("docs/**/*.md")]
    blocks = [(page, b) for page in pages for b in PYTHON_BLOCK.findall(page.read_text())]
    opening = [(page, b) for page, b in blocks if any(o in b for o in opens)]
    # the shared-dist example, the README's rrcm loop and both conan trainer blocks
    assert len(opening) >= 4, [str(page.relative_to(ROOT)) for page, _ in opening]
    for page, block in opening:
        code = [line.split("#")[0] for line in block.splitlines()]  # a comment naming the call is not a call
        assert any(c in line for line in code for c in closes), (
            f"{page.relative_to(ROOT)}: a block opens a process group ({[o for o in opens if o in block]}), "
            "never closes it"
        )
