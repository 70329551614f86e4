"""Result types shared by every tier."""

from __future__ import annotations

from dataclasses import dataclass, field


class RedactionError(Exception):
    """Redaction failed or ran over its time budget: the text must not go anywhere in clear.

    The message is a reason for humans and never contains the text itself."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True, init=False)
class Entity:
    """One detected span of the input text (offsets into the original); never its value."""

    type: str
    start: int
    end: int
    score: float
    tier: str = ""
    """Which tier found it: the detector ("phone", "secret:kv", "person:table"), "names",
    "presidio:<recognizer>" or "ner" (for `gatewatch redact --explain`)."""

    def __init__(self, type: str, start: int, end: int, score: float, tier: str = "") -> None:
        # (The generated __init__ of a frozen dataclass sets each field through
        # object.__setattr__, about twice the cost of the slots' own setters; three
        # entities are built per text on average.)
        _set_type(self, type)
        _set_start(self, start)
        _set_end(self, end)
        _set_score(self, score)
        _set_tier(self, tier)

    def to_dict(self) -> dict:
        return {"type": self.type, "start": self.start, "end": self.end, "score": round(self.score, 3)}

    def explain(self) -> dict:
        return {**self.to_dict(), "tier": self.tier}


_set_type, _set_start, _set_end, _set_score, _set_tier = (
    Entity.__dict__[name].__set__ for name in ("type", "start", "end", "score", "tier"))


@dataclass(frozen=True, slots=True, init=False)
class RedactionResult:
    text: str
    entities: list[Entity] = field(default_factory=list)

    def __init__(self, text: str, entities: list[Entity] | None = None) -> None:
        # (one per text: the slots' setters, as Entity's; no entities -> a new empty list)
        _set_text(self, text)
        _set_entities(self, [] if entities is None else entities)

    @property
    def redacted(self) -> bool:
        return bool(self.entities)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for entity in self.entities:
            out[entity.type] = out.get(entity.type, 0) + 1
        return out


_set_text, _set_entities = (RedactionResult.__dict__[name].__set__ for name in ("text", "entities"))
