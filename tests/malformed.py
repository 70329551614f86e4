"""The fixed malformed corpus (tests/fixtures/malformed/corpus.jsonl) and the PII check
every DLQ test shares."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

CORPUS = Path(__file__).parent / "fixtures" / "malformed" / "corpus.jsonl"
CORPUS_NOW = 1_790_000_000_000  # the event times in the corpus are just before this
RENDERINGS = ("utf-8", "utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be", "latin-1")


@dataclass(frozen=True)
class Malformed:
    name: str
    code: str  # "*": any InvalidEvent code
    value: bytes
    pii: tuple[str, ...]
    flow: bool


def load_corpus() -> list[Malformed]:
    out = []
    for line in CORPUS.read_text().splitlines():
        item = json.loads(line)
        value = b"".join(bytes.fromhex(chunk) * repeat for chunk, repeat in item["parts"])
        out.append(Malformed(item["name"], item["code"], value, tuple(item["pii"]), item["flow"]))
    return out


def leaked(values, data: bytes) -> list[tuple[str, str]]:
    """(value, encoding) of every value found in data in any of RENDERINGS."""
    return [(value, encoding) for value in values for encoding in RENDERINGS
            if value.encode(encoding, "ignore") in data]
