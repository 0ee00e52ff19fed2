"""Scraped HTML page -> cleaned main text (trafilatura), join keys and structured Q/A pairs.

`parse_page` is a pure function of a file path (or URL) so that a process pool can run it.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import lxml.html
import trafilatura

from data_prep import storage
from data_prep.readers.decode import DecodeError, decode_bytes
from data_prep.steps.clean import clean_text

log = logging.getLogger(__name__)

_XML_DECL = re.compile(r"^\s*<\?xml[^>]*\?>", re.I)


@dataclass
class ExtractOptions:
    # fast=True skips trafilatura's readability/justext comparison pass, roughly halving the
    # time per page; favor_precision drops borderline blocks (teasers, link lists, banners).
    fast: bool = True
    favor_precision: bool = True
    include_tables: bool = True
    dl_requires_question: bool = True
    fix_unicode: bool = True


@dataclass
class Page:
    source: str
    text: str = ""
    title: str = ""
    urls: list[str] = field(default_factory=list)
    qa: list[tuple[str, str, str]] = field(default_factory=list)  # (question, answer, where)
    error: str | None = None
    snippet: str = ""


def normalize_url(url: str) -> str:
    """`host/path?query`: scheme, `www.`, fragment and trailing slash dropped, host lowercased,
    so that a sheet's `http://www.x.com/a/` and a page's canonical `https://x.com/a` agree."""
    url = url.strip()
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if not parts.scheme or not parts.netloc:
        return url
    host = parts.netloc.lower().removeprefix("www.")
    path = parts.path.rstrip("/")
    return f"url:{host}{path}" + (f"?{parts.query}" if parts.query else "")


def _node_text(node) -> str:
    return clean_text(node.text_content(), fix_unicode=False)


def _html_to_text(fragment: str) -> str:
    if "<" not in fragment:
        return clean_text(fragment, fix_unicode=False)
    try:
        return _node_text(lxml.html.fragment_fromstring(fragment, create_parent="div"))
    except Exception:  # noqa: BLE001 - a malformed answer snippet is kept as plain text
        return clean_text(re.sub(r"<[^>]+>", " ", fragment), fix_unicode=False)


def _answer_text(answer) -> str:
    if isinstance(answer, list):
        answer = answer[0] if answer else None
    if isinstance(answer, dict):
        answer = answer.get("text") or answer.get("name") or ""
    return _html_to_text(answer) if isinstance(answer, str) else ""


def _schema_qa(items: list[dict]) -> list[tuple[str, str]]:
    """Question/answer pairs from schema.org FAQPage and QAPage items (JSON-LD or microdata)."""
    out: list[tuple[str, str]] = []

    def questions(obj):
        if isinstance(obj, list):
            for o in obj:
                yield from questions(o)
        elif isinstance(obj, dict):
            types = obj.get("@type") or obj.get("type") or ""
            types = types if isinstance(types, list) else [types]
            if any(str(t).endswith("Question") for t in types):
                yield obj
            for key in ("mainEntity", "@graph", "properties", "hasPart"):
                if key in obj:
                    yield from questions(obj[key])

    for q in questions(items):
        name = q.get("name") or q.get("text") or ""
        answer = q.get("acceptedAnswer") or q.get("suggestedAnswer")
        qt, at = _html_to_text(name) if isinstance(name, str) else "", _answer_text(answer)
        if qt and at:
            out.append((qt, at))
    return out


# Marks that end a question: ASCII; full-width (Chinese, Japanese, Korean) and its small form;
# Arabic (also Persian, Urdu); Ethiopic; the interrobang and its kin. Spanish `¿...?` ends in `?`.
_FINAL_QUESTION_MARKS = "?？﹖؟፧‽⁇⁈⁉"
# Armenian marks the question on the stressed word, not at the end of the sentence.
_ARMENIAN_QUESTION_MARK = "՞"
# The Greek question mark U+037E is canonically a plain `;` (NFC turns one into the other, and
# most Greek text is typed with `;`): `;` counts after Greek letters only, or `Note;` would ask.
_GREEK = re.compile(r"[\u0370-\u03ff\u1f00-\u1fff]")


def is_question(text: str) -> bool:
    """Whether a `<dt>` reads as a question, in the scripts whose question marks are listed above."""
    text = text.rstrip()
    if not text:
        return False
    last = text[-1]
    if last in _FINAL_QUESTION_MARKS or last == "\u037e" or _ARMENIAN_QUESTION_MARK in text:
        return True
    return last == ";" and bool(_GREEK.search(text))


def structured_qa(tree, html: str, dl_requires_question: bool = True) -> list[tuple[str, str, str]]:
    """All Q/A pairs of a page, deduplicated on the question, in document order per kind."""
    pairs: list[tuple[str, str, str]] = []
    # extruct re-walks the whole tree; only pay for it when the page has structured data
    if "ld+json" in html or "itemscope" in html:
        import extruct

        try:
            data = extruct.extract(tree, syntaxes=["json-ld", "microdata"], uniform=True, errors="ignore")
        except Exception as err:  # noqa: BLE001 - broken JSON-LD must not lose the page's text
            log.debug("extruct failed: %s", err)
            data = {}
        for kind in ("json-ld", "microdata"):
            pairs += [(q, a, kind) for q, a in _schema_qa(data.get(kind, []))]
    for det in tree.iter("details"):
        summary = det.find(".//summary")
        if summary is None:
            continue
        q = _node_text(summary)
        full = _node_text(det)
        a = full[len(q) :].strip() if full.startswith(q) else full.replace(q, "", 1).strip()
        if q and a:
            pairs.append((q, a, "details"))
    for dl in tree.iter("dl"):
        q = None
        for child in dl:
            if child.tag == "dt":
                q = _node_text(child)
            elif child.tag == "dd" and q:
                a = _node_text(child)
                if a and (is_question(q) or not dl_requires_question):
                    pairs.append((q, a, "dl"))
                q = None
    seen: set[str] = set()
    unique = []
    for q, a, kind in pairs:
        key = " ".join(q.lower().split())
        if key not in seen:
            seen.add(key)
            unique.append((q, a, kind))
    return unique


def page_from_html(html: str, source: str, opts: ExtractOptions) -> Page:
    page = Page(source=source, snippet=html[:300])
    html = _XML_DECL.sub("", html, count=1)
    try:
        tree = lxml.html.document_fromstring(html)
    except Exception as err:  # noqa: BLE001 - lxml raises several types on garbage
        page.error = f"html_parse_error: {type(err).__name__}"
        return page
    for xp in ("//link[@rel='canonical']/@href", "//meta[@property='og:url']/@content"):
        page.urls += [normalize_url(u) for u in tree.xpath(xp) if u.strip()]
    titles = tree.xpath("//title/text()")
    page.title = clean_text(titles[0], fix_unicode=False) if titles else ""
    page.qa = structured_qa(tree, html, opts.dl_requires_question)
    try:
        text = trafilatura.extract(
            tree,
            fast=opts.fast,
            favor_precision=opts.favor_precision,
            include_comments=False,
            include_tables=opts.include_tables,
            include_images=False,
            include_links=False,
            deduplicate=False,
        )
    except Exception as err:  # noqa: BLE001 - one pathological page must not stop the run
        log.debug("trafilatura failed on %s: %s", source, err)
        text = None
    if not text:
        # short or unusual pages (a lone <div>) fall under trafilatura's size heuristics; its
        # baseline (article body / paragraphs / body text) beats losing the page
        try:
            text = trafilatura.baseline(tree)[1]
        except Exception:  # noqa: BLE001
            text = None
    page.text = clean_text(text, fix_unicode=opts.fix_unicode) if text else ""
    if opts.fix_unicode and page.qa:
        page.qa = [(clean_text(q), clean_text(a), k) for q, a, k in page.qa]
    return page


def parse_page(path: str, opts: ExtractOptions | None = None) -> Page:
    """Read, decode and extract one HTML file; failures come back as `Page.error`."""
    opts = opts or ExtractOptions()
    try:
        data = storage.read_bytes(path)
    except OSError as err:
        return Page(source=path, error=f"unreadable: {storage.os_reason(err)}")
    try:
        html = decode_bytes(data)
    except DecodeError as err:
        return Page(source=path, error=str(err), snippet=repr(data[:120]))
    if not html.strip():
        return Page(source=path, error="empty_file")
    if "<" not in html:
        return Page(source=path, error="not_html", snippet=html[:300])
    return page_from_html(html, os.fspath(path), opts)
