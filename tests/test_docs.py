"""The docs point only at files that exist: every relative link and every quoted `results/...` or
`scripts/...` path in README.md, ARCHITECTURE.md and docs/*.md names a file or folder of the repository."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "ARCHITECTURE.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")  # [text](target)
QUOTED = re.compile(r"`((?:results|scripts|docs)/[^`\s]+)`")  # `results/...`, as README quotes them


def referenced_paths(doc: Path) -> list[tuple[str, Path]]:
    """(as written, resolved path) for each local file the document names."""
    text = doc.read_text()
    found = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a web address or an anchor in the same page
        found.append((target, (doc.parent / target.split("#")[0]).resolve()))
    for quoted in QUOTED.findall(text):
        if any(ch in quoted for ch in "*<>{}"):
            continue  # a pattern such as results/eval/<model>, not a path
        found.append((quoted, (ROOT / quoted.rstrip(".,;:")).resolve()))
    return found


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_file_a_document_names_exists(doc):
    references = referenced_paths(doc)
    assert references, f"{doc.name} names no file: the pattern no longer matches how it quotes them"
    missing = [written for written, path in references if not path.exists()]
    assert not missing, f"{doc.name} names files that do not exist: {missing}"
