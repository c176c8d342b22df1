"""Build a real English text corpus from Debian documentation packages (the only text reachable from here).

    python scripts/build_corpus.py [--out runs/corpus] [--packages python3.11-doc ...]

Downloads the packages' .deb files with ``apt-get download`` (no root needed; run ``apt-get update`` first on a fresh
machine), unpacks them with ``dpkg-deb``, and turns every HTML page into one plain-text document (the page's main
content: navigation, sidebars, footers, scripts and Sphinx's pilcrows dropped). Then it keeps English documents of at
least --min-chars characters, drops exact duplicate documents and every repeated paragraph of 40+ characters after its
first occurrence (licence footers, boilerplate, pages shipped twice), and splits the documents into train /
validation / test by a hash of their text, so the split is deterministic and independent of order. Writes
``{train,validation,test}.jsonl`` (one {"text", "source"} object a line; train shuffled with a fixed seed) and
``meta.json`` (package versions, counts, sizes) under --out, and prints the sizes. The data is never committed:
runs/ is git-ignored.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

# English manuals and references in HTML (Debian 12 "bookworm" versions): Python, the Linux kernel, PostgreSQL,
# Django, git, SQLAlchemy, Sphinx, pytest, setuptools, Flask, Requests, SciPy, SymPy, pandas, LibreOffice's help,
# and Debian's own books (the Administrator's Handbook, Reference, Policy, Developer's Reference, New Maintainers'
# Guide).
PACKAGES = ("python3.11-doc", "linux-doc-6.1", "postgresql-doc-15", "python-django-doc", "git-doc",
            "python-sqlalchemy-doc", "sphinx-doc", "python-pytest-doc", "python-setuptools-doc", "python-flask-doc",
            "python-requests-doc", "python-scipy-doc", "python-sympy-doc", "python-pandas-doc",
            "libreoffice-help-en-us", "debian-handbook", "debian-reference-en", "debian-policy",
            "developers-reference", "maint-guide")
# pages that are listings, not prose; highlighted source code (_modules); translations (the kernel's, and the
# Debian Handbook's language folders other than en-US)
SKIP_PATHS = re.compile(r"(^|/)(genindex[^/]*|py-modindex|modindex|search|bookindex)\.html$"
                        r"|/(_sources|_static|_modules|translations)/|/(?!en-US/)[a-z]{2}-[A-Z]{2}/")

_SKIP_TAGS = {"script", "style", "head", "nav", "header", "footer", "aside", "form", "button", "noscript", "svg",
              "title"}
_SKIP_CLASSES = {"related", "sphinxsidebar", "navheader", "navfooter", "footer", "mobile-nav", "headerlink",
                 "wy-nav-side", "rst-footer-buttons", "wy-breadcrumbs", "sidebar", "nav", "toc", "viewcode-link",
                 "docnav"}
_SKIP_IDS = {"footer", "hd", "ft", "global-nav", "sidebar", "toc", "header", "footnotes", "banner", "Contents", "Index"}
_SKIP_ROLES = {"navigation", "search", "note"}  # role="note" is Sphinx's "show source" box
_MAIN = ({"role": "main"}, {"id": "yui-main"}, {"id": "content"})
_BLOCK_TAGS = {"p", "div", "section", "article", "pre", "li", "ul", "ol", "dl", "dt", "dd", "table", "tr", "br",
               "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "hr", "figure", "caption"}
_VOID_TAGS = {"br", "hr", "img", "input", "meta", "link", "wbr", "col", "area", "base", "source"}


class _PageText(HTMLParser):
    """Text of an HTML page, block elements on their own lines, <pre> kept verbatim; the text inside the main
    content element (role="main", #yui-main or #content) is collected apart from the rest."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.all: list[str] = []
        self.main: list[str] = []
        self._skip: list[str] = []  # open tags of the skipped element and its descendants
        self._main: list[str] = []  # likewise for the main content element
        self._pre = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _VOID_TAGS:
            if tag in ("br", "hr"):
                self._text("\n")
            return
        attributes = {name: value or "" for name, value in attrs}
        if self._skip:
            self._skip.append(tag)
            return
        if tag in _SKIP_TAGS or _skipped(attributes):
            self._skip.append(tag)
            return
        if self._main or any(all(attributes.get(k) == v for k, v in selector.items()) for selector in _MAIN):
            self._main.append(tag)
        if tag == "pre":
            self._pre += 1
        if tag in _BLOCK_TAGS:
            self._text("\n\n" if tag in ("p", "pre", "h1", "h2", "h3", "h4", "h5", "h6", "table", "dl") else "\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in _VOID_TAGS:
            return
        if self._skip:
            _close(self._skip, tag)
            return
        if tag == "pre" and self._pre:
            self._pre -= 1
        if tag in _BLOCK_TAGS:
            self._text("\n")
        if self._main:
            _close(self._main, tag)

    def handle_data(self, data: str) -> None:
        if self._skip:
            return
        if not self._pre:
            data = re.sub(r"\s+", " ", data)
            if not self.all or self.all[-1].endswith("\n"):  # no indent from the markup's line breaks
                data = data.lstrip()
        if data:
            self._text(data)

    def _text(self, text: str) -> None:
        self.all.append(text)
        if self._main:
            self.main.append(text)


def _skipped(attributes: dict[str, str]) -> bool:
    return (bool(set(attributes.get("class", "").split()) & _SKIP_CLASSES) or attributes.get("id") in _SKIP_IDS
            or attributes.get("role") in _SKIP_ROLES)


def _close(stack: list[str], tag: str) -> None:
    """Pop ``stack`` down to the innermost open ``tag`` (HTML lets <p>, <li>, ... go unclosed)."""
    if tag in stack:
        while stack.pop() != tag:
            pass


def html_to_text(html: str) -> str:
    """The plain text of an HTML page: its main content if it marks one, else the whole page, navigation aside."""
    parser = _PageText()
    parser.feed(html)
    parser.close()
    text = "".join(parser.main) if "".join(parser.main).strip() else "".join(parser.all)
    lines = [line.rstrip() for line in text.replace("\xa0", " ").replace("¶", "").splitlines()]
    lines = [line if line.strip() else "" for line in lines]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def download(packages: list[str], folder: Path) -> dict[str, Path]:
    """The .deb file of each package (the candidate version), downloaded into ``folder`` unless already there."""
    folder.mkdir(parents=True, exist_ok=True)
    debs = {}
    for package in packages:
        found = sorted(folder.glob(f"{package}_*.deb"))
        if not found:
            subprocess.run(["apt-get", "download", package], cwd=folder, check=True)
            found = sorted(folder.glob(f"{package}_*.deb"))
        if not found:
            raise FileNotFoundError(f"apt-get download {package} wrote no .deb into {folder}")
        debs[package] = found[-1]
    return debs


def package_documents(package: str, deb: Path) -> list[tuple[str, str]]:
    """(source, text) of every HTML page in a .deb, sorted by path."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["dpkg-deb", "-x", str(deb), tmp], check=True)
        pages = sorted(p for p in Path(tmp).rglob("*.html")
                       if p.is_file() and not SKIP_PATHS.search(str(p.relative_to(tmp))))
        return [(f"{package}:/{page.relative_to(tmp)}",
                 html_to_text(page.read_text(encoding="utf-8", errors="replace"))) for page in pages]


def is_english(text: str) -> bool:
    """Mostly ASCII letters: drops translated pages (the kernel's Chinese, Japanese, Korean, Italian docs)."""
    letters = [c for c in text if c.isalpha()]
    return bool(letters) and sum(c.isascii() for c in letters) / len(letters) > 0.98


def dedup(documents: list[tuple[str, str]], min_chars: int) -> list[tuple[str, str]]:
    """Documents of at least ``min_chars`` characters, without exact duplicates and with each paragraph of 40+
    characters kept only at its first occurrence."""
    seen_docs: set[str] = set()
    seen_paragraphs: set[str] = set()
    kept = []
    for source, text in documents:
        paragraphs = []
        for paragraph in text.split("\n\n"):
            key = " ".join(paragraph.split())
            if len(key) >= 40:
                if key in seen_paragraphs:
                    continue
                seen_paragraphs.add(key)
            paragraphs.append(paragraph)
        text = "\n\n".join(paragraphs).strip()
        digest = hashlib.sha256(" ".join(text.split()).encode()).hexdigest()
        if len(text) >= min_chars and digest not in seen_docs:
            seen_docs.add(digest)
            kept.append((source, text))
    return kept


def split_of(text: str, valid_fraction: float, test_fraction: float) -> str:
    """train, validation or test, from the SHA-256 of the text (deterministic, order-independent)."""
    u = int(hashlib.sha256(text.encode()).hexdigest()[:12], 16) / 16**12
    return "validation" if u < valid_fraction else "test" if u < valid_fraction + test_fraction else "train"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--out", type=Path, default=Path("runs/corpus"), help="output folder (default runs/corpus)")
    parser.add_argument("--packages", nargs="+", default=list(PACKAGES), help="Debian documentation packages")
    parser.add_argument("--debs", type=Path, help="folder for the downloaded .deb files (default OUT/debs)")
    parser.add_argument("--min-chars", type=int, default=500, help="shortest document kept (default 500)")
    parser.add_argument("--valid-fraction", type=float, default=0.02)
    parser.add_argument("--test-fraction", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0, help="shuffle of the train split")
    args = parser.parse_args()

    debs = download(args.packages, args.debs or args.out / "debs")
    documents, per_package = [], {}
    for package, deb in debs.items():
        pages = package_documents(package, deb)
        english = [(source, text) for source, text in pages if is_english(text)]
        per_package[package] = {"deb": deb.name, "sha256": hashlib.sha256(deb.read_bytes()).hexdigest(),
                                "pages": len(pages), "english_pages": len(english)}
        print(f"{package}: {len(english)} English pages of {len(pages)}, "
              f"{sum(len(text.encode()) for _, text in english) / 1e6:.1f} MB of text", flush=True)
        documents += english
    documents = dedup(documents, args.min_chars)

    splits: dict[str, list[dict[str, str]]] = {"train": [], "validation": [], "test": []}
    for source, text in documents:
        splits[split_of(text, args.valid_fraction, args.test_fraction)].append({"text": text, "source": source})
    random.Random(args.seed).shuffle(splits["train"])
    args.out.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for name, records in splits.items():
        with (args.out / f"{name}.jsonl").open("w", encoding="utf-8") as out:
            out.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        sizes[name] = {"documents": len(records), "bytes": sum(len(r["text"].encode()) for r in records),
                       "words": sum(len(r["text"].split()) for r in records)}
        print(f"{name:>10}: {sizes[name]['documents']:6d} documents  {sizes[name]['bytes'] / 1e6:8.2f} MB  "
              f"{sizes[name]['words'] / 1e6:7.2f} M words")
    meta = {"packages": per_package, "splits": sizes, "min_chars": args.min_chars,
            "valid_fraction": args.valid_fraction, "test_fraction": args.test_fraction, "seed": args.seed}
    (args.out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {args.out}/{{train,validation,test}}.jsonl and meta.json")


if __name__ == "__main__":
    main()
