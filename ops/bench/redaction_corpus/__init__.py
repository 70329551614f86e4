"""Labeled corpora for `gatewatch bench redaction`, apart from the harness that scores them.

- `realworld` (default): hand-written real-world shapes filled by faker and mimesis in 15
  locales, lookalikes in the clean texts (`realworld.py`);
- `synthetic`: prose with spliced-in PII sentences (`synthetic.py`).
"""

from __future__ import annotations

from ops.bench.redaction_corpus.labels import EVAL_TYPES, PATTERN_TYPES, Sample, SpanBuilder

CORPORA = ("realworld", "synthetic")

__all__ = ["CORPORA", "EVAL_TYPES", "PATTERN_TYPES", "Sample", "SpanBuilder", "generate_corpus"]


def generate_corpus(n: int, seed: int = 7, pii_ratio: float = 0.3, kind: str = "synthetic") -> list[Sample]:
    """n labeled samples of one corpus kind, reproducible by seed."""
    if kind == "realworld":
        from ops.bench.redaction_corpus.realworld import RealWorldGenerator

        return RealWorldGenerator(seed).corpus(n, pii_ratio)
    if kind == "synthetic":
        from ops.bench.redaction_corpus.synthetic import CorpusGenerator

        return CorpusGenerator(seed).corpus(n, pii_ratio)
    raise ValueError(f"unknown corpus {kind!r}; expected one of {', '.join(CORPORA)}")
