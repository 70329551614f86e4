"""Result types shared by every tier."""

from __future__ import annotations

from dataclasses import dataclass, field


class RedactionError(Exception):
    """Redaction failed or ran over its time budget: the text must not go anywhere in clear.

    The message is a reason for humans and never contains the text itself."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Entity:
    """One detected span of the input text (offsets into the original); never its value."""

    type: str
    start: int
    end: int
    score: float
    tier: str = ""
    """Which tier found it: the detector ("phone", "secret:kv", "person:table"), "names",
    "presidio:<recognizer>" or "ner" (for `gatewatch redact --explain`)."""

    def to_dict(self) -> dict:
        return {"type": self.type, "start": self.start, "end": self.end, "score": round(self.score, 3)}

    def explain(self) -> dict:
        return {**self.to_dict(), "tier": self.tier}


@dataclass(frozen=True, slots=True)
class RedactionResult:
    text: str
    entities: list[Entity] = field(default_factory=list)

    @property
    def redacted(self) -> bool:
        return bool(self.entities)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for entity in self.entities:
            out[entity.type] = out.get(entity.type, 0) + 1
        return out
