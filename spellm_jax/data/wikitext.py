"""MediaWiki dumps to plain prose: the articles of an XML dump, and a markup stripper.

The stripper is a pragmatic regex pass, not a parser: it drops templates, tables, references,
files, categories and the reference-list sections, keeps the text of links and headings, and
unwraps a few templates whose argument is prose (`{{lang|fr|...}}`, `{{nowrap|...}}`).
"""

from __future__ import annotations

import bz2
import html
import re
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator
from pathlib import Path

# Sections that hold citations and link lists rather than prose.
_DROPPED_SECTIONS = frozenset({
    "references", "external links", "see also", "further reading", "notes", "bibliography",
    "sources", "footnotes", "citations", "notes and references", "works cited", "literature"})
# Link namespaces whose target is not part of the sentence (interlanguage links are `xx:`).
_DROPPED_LINKS = re.compile(r"^\s*:?\s*(file|image|category|media|wikipedia|wp|wikt|[a-z]{2,3}(-[a-z]+)?):",
                            re.IGNORECASE)
# Tags whose content is not prose; other tags are removed and their content kept.
_DROPPED_ELEMENTS = re.compile(
    r"<(ref|math|gallery|timeline|score|syntaxhighlight|source|imagemap|chem|hiero|graph)\b[^>]*?"
    r"(/>|>.*?</\1\s*>)", re.IGNORECASE | re.DOTALL)
_COMMENT = re.compile(r"<!--.*?(-->|$)", re.DOTALL)
_TAG = re.compile(r"</?[a-zA-Z][^<>]*>")
_INNERMOST_TEMPLATE = re.compile(r"\{\{((?:(?!\{\{|\}\}).)*)\}\}", re.DOTALL)
_INNERMOST_LINK = re.compile(r"\[\[((?:(?!\[\[|\]\]).)*)\]\]", re.DOTALL)
_EXTERNAL_LINK = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]*\s*([^\]]*)\]")
_BARE_URL = re.compile(r"https?://\S+")
_HEADING = re.compile(r"^(={1,6})[ \t]*(.*?)[ \t]*\1[ \t]*$", re.MULTILINE)
_EMPTY_BRACKETS = re.compile(r"\(\s*[,;:]?\s*\)")
_SPACE_BEFORE_PUNCTUATION = re.compile(r"[ \t]+([,.;:!?])")
# Templates kept as their prose argument: name -> index of that argument among the positional ones.
_PROSE_TEMPLATES = {"lang": -1, "nowrap": 0, "nobr": 0, "small": 0, "smaller": 0, "em": 0,
                    "sic": 0, "not a typo": 0, "ill": 0, "transl": -1, "script": -1}


def wiki_articles(dump: Path) -> Iterator[tuple[str, str]]:
    """`(title, wiki markup)` of every main-namespace page of a (bz2) XML dump, redirects skipped."""
    opener = bz2.open if dump.suffix == ".bz2" else open
    with opener(dump, "rb") as handle:
        for _, element in ElementTree.iterparse(handle):
            if element.tag.rsplit("}", 1)[-1] != "page":
                continue
            namespace = element.findtext("{*}ns")
            markup = element.findtext("{*}revision/{*}text") or ""
            redirect = element.find("{*}redirect") is not None or markup.lstrip().upper().startswith(
                "#REDIRECT")
            if namespace == "0" and not redirect:
                yield element.findtext("{*}title") or "", markup
            element.clear()


def _template_text(match: re.Match) -> str:
    """The prose argument of a `_PROSE_TEMPLATES` template, a converted quantity, else nothing."""
    name, *arguments = match.group(1).split("|")
    name = name.strip().lower().replace("_", " ")
    positional = [arg for arg in arguments if "=" not in arg]
    if name.startswith("lang-"):
        name = "lang"
    if name in ("convert", "cvt") and len(positional) >= 2:
        return f"{positional[0].strip()} {positional[1].strip()}"
    index = _PROSE_TEMPLATES.get(name)
    if index is None or not positional:
        return ""
    return positional[index]


def _link_text(match: re.Match) -> str:
    """`[[target|label]]` -> label, `[[target]]` -> target; files, categories and interlanguage
    links -> nothing."""
    inner = match.group(1)
    if _DROPPED_LINKS.match(inner):
        return ""
    return inner.rsplit("|", 1)[-1]


def _replace_until_stable(pattern: re.Pattern, replacement, text: str) -> str:
    """Applies `pattern.sub` until nothing matches (innermost-first removal of nested markup)."""
    while True:
        text, count = pattern.subn(replacement, text)
        if not count:
            return text


def _drop_tables(text: str) -> str:
    """Removes `{| ... |}` tables (line-based, nesting-aware)."""
    kept, depth = [], 0
    for line in text.split("\n"):
        stripped = line.lstrip()
        if stripped.startswith("{|"):
            depth += 1
        elif depth and stripped.startswith("|}"):
            depth -= 1
        elif not depth:
            kept.append(line)
    return "\n".join(kept)


def _drop_sections(text: str) -> str:
    """Headings become plain lines; reference-list sections (and their sub-sections) go."""
    kept: list[str] = []
    dropping_level = 0  # level of the heading whose section is being dropped, 0 when keeping
    position = 0
    for heading in _HEADING.finditer(text):
        if not dropping_level:
            kept.append(text[position:heading.start()])
        level, title = len(heading.group(1)), heading.group(2).strip()
        if dropping_level and level > dropping_level:
            position = heading.end()
            continue
        dropping_level = level if title.lower() in _DROPPED_SECTIONS else 0
        if not dropping_level:
            kept.append(f"\n\n{title}\n\n")
        position = heading.end()
    if not dropping_level:
        kept.append(text[position:])
    return "".join(kept)


def _tidy_lines(text: str) -> str:
    """List markers and indentation off, whitespace normalised, blank runs collapsed."""
    lines = []
    for line in text.split("\n"):
        line = re.sub(r"^[*#:;]+\s*", "", line.strip())
        line = re.sub(r"[ \t\u00a0]{2,}", " ", line).strip()
        if line == "----" or (line and not re.search(r"\w", line)):
            continue
        lines.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def strip_wiki_markup(markup: str) -> str:
    """Plain prose of one article's wiki markup (see the module docstring for what is kept)."""
    text = _COMMENT.sub("", markup)
    text = _DROPPED_ELEMENTS.sub("", text)
    text = _replace_until_stable(_INNERMOST_TEMPLATE, _template_text, text)
    text = text.replace("{{", "").replace("}}", "")  # unbalanced leftovers
    text = _drop_tables(text)
    text = _replace_until_stable(_INNERMOST_LINK, _link_text, text)
    text = text.replace("[[", "").replace("]]", "")
    text = _EXTERNAL_LINK.sub(r"\1", text)
    text = _BARE_URL.sub("", text)
    text = _TAG.sub("", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"__[A-Z]+__", "", text)
    text = _drop_sections(text)
    text = html.unescape(text)
    text = _EMPTY_BRACKETS.sub("", text)
    text = _SPACE_BEFORE_PUNCTUATION.sub(r"\1", text)
    return _tidy_lines(text)
