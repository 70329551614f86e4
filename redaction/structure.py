"""Names found by where they sit rather than by what they are.

Names from anywhere in the world (no gazetteer knows them all) are still easy to place when
the text says what a value is: a CSV or markdown-table column headed "Name", the line under a
signature delimiter ("-- "), or a chat self-introduction ("hey its ngozi okeke here").
Each rule is a Detector like the pattern ones: a loose gate for the compiled scan and a
finder for the windows around its hits.
"""

from __future__ import annotations

import re

from redaction.patterns import Detector, Finder
from redaction.types import Entity

_WORD = r"[^\W\d_]+(?:['’\-][^\W\d_]+)*"
# One to four words, letters only (a cell like "Ana López" or "Kim Min-jun", not "A-1234").
NAME_CELL = re.compile(rf"[ \t]*(?P<name>{_WORD}(?:[ \t]+{_WORD}){{0,3}})[ \t]*")
NAME_HEADER = re.compile(r"(?i)^[ \t]*(?:full[ _]?name|name|customer|contact|employee|client|patient|owner|"
                         r"assignee|holder|first[ _]name|last[ _]name|surname|person)[ \t]*$")
SIGNATURE = re.compile(rf"(?m)^--[ \t]?\r?\n[ \t]*(?P<name>{_WORD}(?:[ \t]+{_WORD}){{1,3}})[ \t]*$")
SELF_INTRO = re.compile(
    rf"(?i)\b(?:it'?s|this is|i'?m|hi,?|hey,?|hello,?)[ \t]+(?!(?:it'?s|this|i'?m|im)\b)(?P<name>{_WORD}(?:[ \t]+{_WORD}){{0,3}})[ \t]*,?[ \t]+"
    r"(?:here|again|speaking)\b")


def _table_names(text: str, lo: int, hi: int) -> list[Entity]:
    """Cells under a name-like header of a CSV or markdown table starting in the window."""
    out: list[Entity] = []
    line_start = text.rfind("\n", 0, lo) + 1
    while line_start < hi:
        line_end = text.find("\n", line_start)
        line_end = len(text) if line_end < 0 else line_end
        header = text[line_start:line_end]
        sep = "|" if header.count("|") >= 2 else ","
        cells = header.split(sep)
        columns = [i for i, cell in enumerate(cells) if NAME_HEADER.match(cell)]
        if len(cells) >= 2 and columns:
            out.extend(_column_cells(text, line_end + 1, sep, len(cells), columns))
        line_start = line_end + 1
    return out


def _column_cells(text: str, pos: int, sep: str, width: int, columns: list[int]) -> list[Entity]:
    out = []
    while pos < len(text):
        end = text.find("\n", pos)
        end = len(text) if end < 0 else end
        row = text[pos:end]
        if row.count(sep) != width - 1:
            break
        offset = pos
        for index, cell in enumerate(row.split(sep)):
            if index in columns:
                m = NAME_CELL.fullmatch(cell)
                if m:
                    out.append(Entity("PERSON", offset + m.start("name"), offset + m.end("name"), 0.8))
            offset += len(cell) + 1
        pos = end + 1
    return out


def make_intro_finder(common: frozenset[str]) -> Finder:
    def find(text: str, lo: int, hi: int) -> list[Entity]:
        out = []
        for regex in (SIGNATURE, SELF_INTRO):
            for m in regex.finditer(text, lo, hi):
                words = [w.lower() for w in m.group("name").split()]
                if all(w in common for w in words) or any(len(w) < 2 for w in words):
                    continue  # "it's me again", "-- \nBest wishes"
                if regex is SELF_INTRO and any(w in _FUNCTION_WORDS for w in words):
                    continue
                out.append(Entity("PERSON", m.start("name"), m.end("name"), 0.75))
        return out

    return find


_FUNCTION_WORDS = frozenset("me you we us it that this the a an my your our his her their just still back not so "
                            "also all done out in on at from with".split())


def structure_detectors(common: frozenset[str]) -> list[Detector]:
    intro = make_intro_finder(common)
    return [
        Detector("person:table", "PERSON", (rb"(?:^|[,|\n])[ \t]*(?:full[ _]?)?name[ \t]*(?:[,|\r\n])",), 200, 8000,
                 _table_names, caseless=True),
        Detector("person:signature", "PERSON", (rb"(?:^|\n)--[ \t]?\r?\n",), 4, 120, intro),
        Detector("person:intro", "PERSON",
                 (rb"\b(?:it'?s|this is|i'?m|hi|hey|hello),?[ \t]+(?:\S+[ \t]+){1,4}(?:here|again|speaking)\b",), 100, 4,
                 intro, caseless=True),
    ]
