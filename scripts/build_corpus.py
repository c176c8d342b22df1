"""Build a real English text corpus from Debian documentation packages (the only text reachable from here).

    python scripts/build_corpus.py [--out runs/corpus] [--packages python3.11-doc ...] [--count-tokens runs/tok32k]

Downloads the packages' .deb files with ``apt-get download`` (no root needed; run ``apt-get update`` first on a fresh
machine), unpacks them with ``dpkg-deb``, and turns every file of a known format into plain-text documents: an HTML page
(its main content: navigation, sidebars, footers, scripts and Sphinx's pilcrows dropped), an English man page (rendered
by groff), and a dictd dictionary (its entries in runs of about 20k characters). Then it keeps English documents of at
least --min-chars characters, drops exact duplicate documents and every repeated paragraph of 40+ characters after its
first occurrence (licence footers, boilerplate, pages shipped twice), and splits the documents into train / validation /
test by a hash of their text, so the split is deterministic, independent of order, and no held-out document is trained
on. Writes ``{train,validation,test}.jsonl`` (one {"text", "source"} object a line; train shuffled with a fixed seed)
and ``meta.json`` (package versions, counts, sizes, per-package documents and characters of each split) under --out, and
prints the sizes. With --count-tokens FOLDER it also counts each package's tokens in each split under the tokenizer in
FOLDER, training a byte-level BPE (--vocab-size, default 32768) on the train split there first when FOLDER holds none.
The data is never committed: runs/ is git-ignored.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import re
import subprocess
import tempfile
from html.parser import HTMLParser
from multiprocessing import Pool
from pathlib import Path

# English manuals and references in HTML (Debian 12 "bookworm" versions): Python, the Linux kernel, PostgreSQL,
# Django, git, SQLAlchemy, Sphinx, pytest, setuptools, Flask, Requests, SciPy, SymPy, pandas, LibreOffice's help,
# and Debian's own books (the Administrator's Handbook, Reference, Policy, Developer's Reference, New Maintainers'
# Guide); then Rust (the books and the standard library), Java 17 (Javadoc), C and C++ (cppreference), Erlang/OTP,
# Racket, GHC, SageMath, statsmodels, Astropy, LLVM, Clang, CMake, Node.js, Octave, LilyPond, scikit-learn, Twisted,
# Qt 5, Dask and scikit-image; the man pages of Linux, Perl and FreeBSD; four dictionaries (GCIDE, WordNet, FOLDOC,
# the Jargon File); then Boost, the Apache HTTP Server, Maxima, SWI-Prolog, zsh, BIND 9, gnuplot, R, cryptography,
# Werkzeug, Jinja, KiCad, and the man pages of OpenSSL, Tcl and Tk.
PACKAGES = ("python3.11-doc", "linux-doc-6.1", "postgresql-doc-15", "python-django-doc", "git-doc",
            "python-sqlalchemy-doc", "sphinx-doc", "python-pytest-doc", "python-setuptools-doc", "python-flask-doc",
            "python-requests-doc", "python-scipy-doc", "python-sympy-doc", "python-pandas-doc",
            "libreoffice-help-en-us", "debian-handbook", "debian-reference-en", "debian-policy",
            "developers-reference", "maint-guide",
            "rust-doc", "openjdk-17-doc", "cppreference-doc-en-html", "erlang-doc", "racket-doc", "ghc-doc",
            "sagemath-doc", "python-statsmodels-doc", "python-astropy-doc", "llvm-15-doc", "clang-15-doc",
            "cmake-doc", "nodejs-doc", "octave-doc", "lilypond-doc-html", "python-sklearn-doc", "twisted-doc",
            "qtbase5-doc-html", "python-dask-doc", "python-skimage-doc",
            "manpages", "manpages-dev", "perl-doc", "freebsd-manpages",
            "dict-gcide", "dict-wn", "dict-foldoc", "dict-jargon",
            "libboost1.74-doc", "apache2-doc", "maxima-doc", "swi-prolog-doc", "zsh-doc", "bind9-doc", "gnuplot-doc",
            "r-doc-html", "python-cryptography-doc", "python-werkzeug-doc", "python-jinja2-doc", "kicad-doc-en",
            "libssl-doc", "tcl8.6-doc", "tk8.6-doc")
# pages that are listings, not prose: indexes, Javadoc's class lists, trees and cross-references, Qt's member lists;
# highlighted source code (Sphinx's _modules, rustdoc's and Haddock's src/, Doxygen's *_source.html); rustdoc's 26k
# pages of SIMD intrinsics (core::arch, one generated stub per instruction); translations (the kernel's, SageMath's,
# and the Debian Handbook's language folders other than en-US)
SKIP_PATHS = re.compile(r"(^|/)(genindex[^/]*|py-modindex|modindex|search|bookindex|index-all|allclasses[^/]*"
                        r"|allpackages-index|overview-tree|package-tree|package-use|deprecated-list|constant-values"
                        r"|serialized-form|help-doc|new-list|preview-list|system-properties|[^/]*_source"
                        r"|[^/]*-members)\.html$"
                        r"|/(_sources|_static|_modules|translations|class-use|index-files|src)/|/html/core/(core_)?arch/"
                        r"|/html/(ca|de|es|fr|hu|it|ja|ko|pt|ru|tr|zh)/|/(?!en-US/)[a-z]{2}-[A-Z]{2}/")
# English man pages (translations live in man/LANG/manN/)
MAN_PAGE = re.compile(r"(^|/)usr/share/man/man[^/]+/[^/]+\.[0-9n][^/]*$")
DICTIONARY = re.compile(r"\.dict(\.dz)?$")
DICTIONARY_CHARS = 20_000  # a dictionary's entries are grouped into documents of about this many characters

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


def man_to_text(roff: str) -> str:
    """The plain text of a man page, rendered by groff without line wrapping, hyphenation or overstriking; the
    running header and footer dropped, and a table's rules (as wide as the unwrapped line) cut to 8 characters. A
    page that only includes another (``.so``) has no text of its own."""
    if roff.lstrip().startswith(".so "):
        return ""
    rendered = subprocess.run(["groff", "-t", "-man", "-Tutf8", "-rLL=4000n", "-rHY=0", "-P-cbou"],
                              input=roff.encode(), capture_output=True, check=False).stdout.decode(errors="replace")
    lines = [line.strip() for line in rendered.splitlines()]
    content = [i for i, line in enumerate(lines) if line]
    lines = lines[content[0] + 1:content[-1]] if len(content) > 2 else []
    lines = [re.sub(r"([\u2500-\u257f])\1{8,}", r"\1" * 8, re.sub(r"\s{2,}", "  ", line)) for line in lines]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _base64_number(digits: str) -> int:
    """A dictd index number: base 64 digits, most significant first."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    value = 0
    for digit in digits:
        value = value * 64 + alphabet.index(digit)
    return value


def dictionary_documents(data: bytes, index: str, chars: int = DICTIONARY_CHARS) -> list[str]:
    """The entries of a dictd dictionary (``data``: the uncompressed .dict; ``index``: its .index, one "headword TAB
    offset TAB length" line per headword), in the order they are stored, grouped into documents of at least ``chars``
    characters. The database's own entries (headwords "00-database-...") are left out."""
    spans = set()
    for line in index.splitlines():
        fields = line.split("\t")
        if len(fields) >= 3 and not fields[0].startswith("00-database") and not fields[0].startswith("00database"):
            spans.add((_base64_number(fields[1]), _base64_number(fields[2])))
    documents, entries, size = [], [], 0
    for offset, length in sorted(spans):
        entry = data[offset:offset + length].decode("utf-8", errors="replace").strip()
        entries.append(entry)
        size += len(entry)
        if size >= chars:
            documents.append("\n\n".join(entries))
            entries, size = [], 0
    if entries:
        documents.append("\n\n".join(entries))
    return documents


def _read(path: Path) -> bytes:
    """The bytes of a file, gunzipped when it is gzip or dictzip (``.gz``, ``.dz``)."""
    data = path.read_bytes()
    return gzip.decompress(data) if path.suffix in (".gz", ".dz") else data


def file_documents(root: Path, relative: str) -> list[tuple[str, str]]:
    """(name, text) of each document in the file ``root/relative``, by its format (HTML page, English man page,
    dictd dictionary); none for a file of another format or a listing page (``SKIP_PATHS``)."""
    path = root / relative
    if path.is_symlink() or not path.is_file():
        return []
    if relative.endswith((".html", ".htm")) and not SKIP_PATHS.search(relative):
        return [(relative, html_to_text(path.read_text(encoding="utf-8", errors="replace")))]
    if MAN_PAGE.search(relative):
        return [(relative, man_to_text(_read(path).decode("utf-8", errors="replace")))]
    if DICTIONARY.search(relative):
        index = path.with_name(DICTIONARY.sub(".index", path.name)).read_text(encoding="utf-8", errors="replace")
        return [(f"{relative}#{i}", text) for i, text in enumerate(dictionary_documents(_read(path), index))]
    return []


def _file_documents(task: tuple[str, str]) -> list[tuple[str, str]]:
    return file_documents(Path(task[0]), task[1])


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


def package_documents(package: str, deb: Path, pool: Pool) -> list[tuple[str, str]]:
    """(source, text) of every document in a .deb, sorted by path; the files are read by ``pool``'s processes."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["dpkg-deb", "-x", str(deb), tmp], check=True)
        files = sorted(str(p.relative_to(tmp)) for p in Path(tmp).rglob("*") if not p.is_dir())
        found = pool.imap(_file_documents, [(tmp, relative) for relative in files], chunksize=16)
        return [(f"{package}:/{name}", text) for documents in found for name, text in documents]


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


def source_counts(splits: dict[str, list[dict[str, str]]]) -> dict[str, dict[str, dict[str, int]]]:
    """Documents and characters of each package (the part of a record's source before ":/") in each split."""
    counts: dict[str, dict[str, dict[str, int]]] = {}
    for name, records in splits.items():
        for record in records:
            split = counts.setdefault(record["source"].split(":/")[0], {}).setdefault(
                name, {"documents": 0, "characters": 0})
            split["documents"] += 1
            split["characters"] += len(record["text"])
    return counts


def count_tokens(splits: dict[str, list[dict[str, str]]], counts: dict[str, dict[str, dict[str, int]]],
                 tokenizer: Path, vocab_size: int, batch: int = 512) -> None:
    """Add each package's token count in each split to ``counts``, under the byte-level BPE in the folder
    ``tokenizer``; one is trained on the train split there first when the folder holds none."""
    from tokenizers import Tokenizer

    from efla.train.tokenizer import train_bpe

    if not (tokenizer / "tokenizer.json").exists():
        print(f"training a {vocab_size}-token BPE on the train split into {tokenizer}", flush=True)
        train_bpe((record["text"] for record in splits["train"]), tokenizer, vocab_size=vocab_size)
    bpe = Tokenizer.from_file(str(tokenizer / "tokenizer.json"))
    for name, records in splits.items():
        for start in range(0, len(records), batch):
            chunk = records[start:start + batch]
            for record, encoding in zip(chunk, bpe.encode_batch([r["text"] for r in chunk]), strict=True):
                split = counts[record["source"].split(":/")[0]][name]
                split["tokens"] = split.get("tokens", 0) + len(encoding.ids)


def _print_sources(counts: dict[str, dict[str, dict[str, int]]]) -> None:
    for package, splits in counts.items():
        train = splits.get("train", {})
        held_out = sum(split["documents"] for name, split in splits.items() if name != "train")
        tokens = f"  {train['tokens'] / 1e6:8.2f} M train tokens" if "tokens" in train else ""
        print(f"{package:>28}: {train.get('documents', 0):6d} train + {held_out:4d} held-out documents  "
              f"{train.get('characters', 0) / 1e6:8.2f} M train characters{tokens}")


def read_splits(folder: Path) -> dict[str, list[dict[str, str]]]:
    """The records of {train,validation,test}.jsonl in ``folder``."""
    splits = {}
    for name in ("train", "validation", "test"):
        with (folder / f"{name}.jsonl").open(encoding="utf-8") as lines:
            splits[name] = [json.loads(line) for line in lines]
    return splits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--out", type=Path, default=Path("runs/corpus"), help="output folder (default runs/corpus)")
    parser.add_argument("--packages", nargs="+", default=list(PACKAGES), help="Debian documentation packages")
    parser.add_argument("--debs", type=Path, help="folder for the downloaded .deb files (default OUT/debs)")
    parser.add_argument("--min-chars", type=int, default=500, help="shortest document kept (default 500)")
    parser.add_argument("--valid-fraction", type=float, default=0.02)
    parser.add_argument("--test-fraction", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0, help="shuffle of the train split")
    parser.add_argument("--workers", type=int, default=2, help="processes that read the packages' files")
    parser.add_argument("--count-tokens", type=Path, metavar="TOKENIZER",
                        help="count each package's tokens under the tokenizer in this folder (trained on the train "
                             "split first when the folder holds none)")
    parser.add_argument("--vocab-size", type=int, default=32768, help="of a tokenizer trained by --count-tokens")
    parser.add_argument("--counts-only", action="store_true",
                        help="read the splits already in --out instead of building them, and only count")
    args = parser.parse_args()

    meta_path = args.out / "meta.json"
    if args.counts_only:
        splits, meta = read_splits(args.out), json.loads(meta_path.read_text())
    else:
        splits, meta = build(args)
    meta["sources"] = source_counts(splits)
    if args.count_tokens:
        count_tokens(splits, meta["sources"], args.count_tokens, args.vocab_size)
        meta["tokenizer"] = {"path": str(args.count_tokens), "vocab_size": args.vocab_size}
        for name in splits:
            meta["splits"][name]["tokens"] = sum(c[name].get("tokens", 0) for c in meta["sources"].values()
                                                 if name in c)
    _print_sources(meta["sources"])
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {meta_path}")


def build(args: argparse.Namespace) -> tuple[dict[str, list[dict[str, str]]], dict]:
    """Download, extract, deduplicate and split the packages; write the splits; return them and meta.json's dict."""
    debs = download(args.packages, args.debs or args.out / "debs")
    documents, per_package = [], {}
    with Pool(args.workers) as pool:
        for package, deb in debs.items():
            found = package_documents(package, deb, pool)
            english = [(source, text) for source, text in found if is_english(text)]
            per_package[package] = {"deb": deb.name, "sha256": hashlib.sha256(deb.read_bytes()).hexdigest(),
                                    "documents": len(found), "english_documents": len(english)}
            print(f"{package}: {len(english)} English documents of {len(found)}, "
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
    return splits, meta


if __name__ == "__main__":
    main()
