"""scripts/build_corpus.py: each format's text extractor on a tiny inline sample, the paths it skips, deduplication,
the split by document, and the per-source counts. Nothing is downloaded."""

from __future__ import annotations

import gzip
import importlib.util
import shutil
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "build_corpus.py"


@pytest.fixture(scope="module")
def corpus():
    spec = importlib.util.spec_from_file_location("build_corpus", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


needs_groff = pytest.mark.skipif(shutil.which("groff") is None, reason="renders man pages with groff")

PAGE = """<html><head><title>T</title><script>var x = 1;</script></head><body>
<nav>Home | Next</nav>
<div role="main"><h1>Sorting<a class="headerlink" href="#s">¶</a></h1>
<p>Lists sort   in place,
stably.</p>
<pre>xs.sort()
  key=len</pre>
<div class="footer">Licence footer</div></div>
<footer>Copyright</footer></body></html>"""

MAN = r""".TH FOO 1 2024 "foo 1.0" "User Commands"
.SH NAME
foo \- frobnicate files
.SH DESCRIPTION
.B foo
reads each \fIfile\fR and writes a line long enough that groff would wrap it at eighty columns and hyphenate a word
if it were allowed to, which it is not here.
.TP
.B \-v
verbose.
"""


def _base64(number: int) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    digits = ""
    while True:
        number, digit = divmod(number, 64)
        digits = alphabet[digit] + digits
        if not number:
            return digits


def _dictionary(entries: dict[str, str], aliases: dict[str, str] | None = None) -> tuple[bytes, str]:
    """A dictd .dict (entries stored in order) and its .index, sorted by headword; an alias is a second headword
    pointing at the entry of another."""
    data, spans = b"", {}
    for headword, text in entries.items():
        body = text.encode()
        spans[headword] = f"{_base64(len(data))}\t{_base64(len(body))}"
        data += body
    spans |= {alias: spans[headword] for alias, headword in (aliases or {}).items()}
    return data, "".join(f"{headword}\t{span}\n" for headword, span in sorted(spans.items()))


def test_html_keeps_the_main_content_as_text(corpus):
    text = corpus.html_to_text(PAGE)
    assert text == "Sorting\n\nLists sort in place, stably.\n\nxs.sort()\n  key=len"


@pytest.mark.parametrize("path, skipped", [
    ("usr/share/doc/python3/html/genindex-A.html", True),
    ("usr/share/doc/python3/html/_modules/json.html", True),
    ("usr/share/doc/python3/html/library/json.html", False),
    ("usr/share/doc/openjdk-17-jre-headless/api/allclasses-index.html", True),
    ("usr/share/doc/openjdk-17-jre-headless/api/java.base/java/util/class-use/List.html", True),
    ("usr/share/doc/openjdk-17-jre-headless/api/java.base/java/util/package-tree.html", True),
    ("usr/share/doc/openjdk-17-jre-headless/api/java.base/java/util/List.html", False),
    ("usr/share/doc/rust-doc/html/src/core/option.rs.html", True),
    ("usr/share/doc/rust-doc/html/core/core_arch/x86/fn._mm_add_ps.html", True),
    ("usr/share/doc/rust-doc/html/core/option/enum.Option.html", False),
    ("usr/share/doc/libfoo-doc/html/foo_8h_source.html", True),
    ("usr/share/doc/ghc-doc/html/libraries/base-4.15.1.0/src/Data.List.html", True),
    ("usr/share/doc/ghc-doc/html/libraries/base-4.15.1.0/Data-List.html", False),
    ("usr/share/qt5/doc/qtcore/qstring-members.html", True),
    ("usr/share/qt5/doc/qtcore/qstring.html", False),
    ("usr/share/doc/sagemath-doc/html/fr/tutorial/index.html", True),
    ("usr/share/doc/sagemath-doc/html/en/tutorial/index.html", False),
    ("usr/share/doc/debian-handbook/html/de-DE/index.html", True),
    ("usr/share/doc/debian-handbook/html/en-US/index.html", False),
])
def test_listing_and_source_pages_are_skipped(corpus, path, skipped):
    assert bool(corpus.SKIP_PATHS.search(path)) == skipped


@needs_groff
def test_man_page_is_rendered_unwrapped_without_header_and_footer(corpus):
    text = corpus.man_to_text(MAN)
    assert text.startswith("NAME\nfoo - frobnicate files\n\nDESCRIPTION\n")
    assert "foo reads each file and writes a line long enough" in text
    assert "hyphenate a word if it were allowed to, which it is not here." in text  # one line: no wrap, no hyphen
    assert "FOO(1)" not in text and "User Commands" not in text and "2024" not in text
    assert "-v  verbose." in text


@needs_groff
def test_man_page_table_rules_do_not_span_the_unwrapped_line(corpus):
    text = corpus.man_to_text(".TH T 1\n.SH TABLE\n.TS\nexpand box;\nl l.\nname\tvalue\n.TE\n.SH END\nDone.\n")
    assert "name" in text and "value" in text and text.endswith("END\nDone.")
    assert max(len(line) for line in text.splitlines()) < 80
    assert "─" * 8 in text and "─" * 9 not in text


def test_man_page_that_includes_another_has_no_text(corpus):
    assert corpus.man_to_text(".so man3/printf.3\n") == ""


def test_dictionary_entries_in_stored_order_grouped_into_documents(corpus):
    entries = {"00-database-info": "about this database", "apple": "apple n. a fruit",
               "banana": "banana n. another fruit", "cherry": "cherry n. a small fruit"}
    data, index = _dictionary(entries, aliases={"aka": "banana"})
    assert corpus.dictionary_documents(data, index, chars=30) == [
        "apple n. a fruit\n\nbanana n. another fruit", "cherry n. a small fruit"]
    assert corpus.dictionary_documents(data, index, chars=1) == [
        "apple n. a fruit", "banana n. another fruit", "cherry n. a small fruit"]  # "aka" adds no entry


@needs_groff
def test_file_documents_picks_the_extractor_by_format(corpus, tmp_path):
    def write(relative: str, data: bytes) -> None:
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(data)

    write("usr/share/doc/x/html/page.html", PAGE.encode())
    write("usr/share/doc/x/html/genindex.html", PAGE.encode())
    write("usr/share/man/man1/foo.1.gz", gzip.compress(MAN.encode()))
    write("usr/share/man/de/man1/foo.1.gz", gzip.compress(MAN.encode()))  # a translation
    data, index = _dictionary({"apple": "apple n. a fruit", "banana": "banana n. another fruit"})
    write("usr/share/dictd/fruit.dict.dz", gzip.compress(data))
    write("usr/share/dictd/fruit.index", index.encode())
    (tmp_path / "usr/share/doc/x/html/link.html").symlink_to(tmp_path / "usr/share/doc/x/html/page.html")

    def found(relative: str) -> list[tuple[str, str]]:
        return corpus.file_documents(tmp_path, relative)

    assert found("usr/share/doc/x/html/page.html") == [("usr/share/doc/x/html/page.html", corpus.html_to_text(PAGE))]
    assert found("usr/share/man/man1/foo.1.gz") == [("usr/share/man/man1/foo.1.gz", corpus.man_to_text(MAN))]
    assert found("usr/share/dictd/fruit.dict.dz") == [
        ("usr/share/dictd/fruit.dict.dz#0", "apple n. a fruit\n\nbanana n. another fruit")]
    for skipped in ("usr/share/doc/x/html/genindex.html", "usr/share/man/de/man1/foo.1.gz",
                    "usr/share/dictd/fruit.index", "usr/share/doc/x/html/link.html"):
        assert found(skipped) == []


def test_dedup_drops_repeated_paragraphs_duplicates_and_short_documents(corpus):
    footer = "This page is licensed under the same terms as the project itself."
    documents = [("a", f"First page, long enough.\n\n{footer}"), ("b", f"Second page, long enough.\n\n{footer}"),
                 ("c", "Second   page,\nlong enough."), ("d", "Tiny.")]
    assert corpus.dedup(documents, min_chars=10) == [
        ("a", f"First page, long enough.\n\n{footer}"), ("b", "Second page, long enough.")]


def test_split_is_a_function_of_the_document_text(corpus):
    texts = [f"document number {i}" for i in range(4000)]
    splits = [corpus.split_of(text, 0.1, 0.2) for text in texts]
    assert splits == [corpus.split_of(text, 0.1, 0.2) for text in reversed(texts)][::-1]
    assert 0.08 < splits.count("validation") / len(texts) < 0.12
    assert 0.18 < splits.count("test") / len(texts) < 0.22


def test_source_counts_and_token_counts_per_package(corpus, tmp_path):
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer

    splits = {"train": [{"text": f"the quick brown fox {i} jumps over the lazy dog", "source": "a-doc:/x.html"}
                        for i in range(50)] + [{"text": "lorem ipsum dolor sit amet", "source": "b-doc:/y.1.gz"}],
              "validation": [{"text": "the lazy dog sleeps", "source": "a-doc:/z.html"}], "test": []}
    counts = corpus.source_counts(splits)
    assert counts["a-doc"]["train"]["documents"] == 50
    assert counts["a-doc"]["validation"] == {"documents": 1, "characters": len("the lazy dog sleeps")}
    assert counts["b-doc"] == {"train": {"documents": 1, "characters": len("lorem ipsum dolor sit amet")}}

    corpus.count_tokens(splits, counts, tmp_path / "tok", vocab_size=300)
    bpe = Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json"))
    assert 259 < bpe.get_vocab_size() <= 300  # the tiny text runs out of merges just short of 300
    assert counts["a-doc"]["train"]["tokens"] == sum(len(bpe.encode(r["text"]).ids) for r in splits["train"][:50])
    assert counts["b-doc"]["train"]["tokens"] == len(bpe.encode("lorem ipsum dolor sit amet").ids)
    assert counts["a-doc"]["validation"]["tokens"] == len(bpe.encode("the lazy dog sleeps").ids)
