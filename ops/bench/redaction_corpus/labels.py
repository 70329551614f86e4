"""What every corpus produces: texts with labeled spans, built piece by piece so that the
generator, not any recogniser, knows where each value sits."""

from __future__ import annotations

from dataclasses import dataclass, field

EVAL_TYPES = ("PERSON", "EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "US_SSN", "IP_ADDRESS",
              "CRYPTO", "SECRET")
PATTERN_TYPES = tuple(t for t in EVAL_TYPES if t != "PERSON")


@dataclass
class Sample:
    text: str
    spans: list[tuple[str, int, int]] = field(default_factory=list)
    locale: str = "-"
    """The locale the sample's values come from (per-locale scores group by it)."""

    @property
    def has_pii(self) -> bool:
        return bool(self.spans)


class SpanBuilder:
    def __init__(self):
        self.parts: list[str] = []
        self.size = 0
        self.spans: list[tuple[str, int, int]] = []

    def add(self, text: str, label: str | None = None) -> None:
        if label:
            self.spans.append((label, self.size, self.size + len(text)))
        self.parts.append(text)
        self.size += len(text)

    def template(self, template: str, values: dict[str, tuple[str | None, str]]) -> None:
        """Fill {slot}s; each value is (label or None, text); "{{" and "}}" are literal braces."""
        pos = 0
        literal: list[str] = []
        while pos < len(template):
            ch = template[pos]
            if ch in "{}" and template.startswith(ch * 2, pos):
                literal.append(ch)
                pos += 2
            elif ch == "{":
                end = template.index("}", pos)
                self.add("".join(literal))
                literal.clear()
                label, text = values[template[pos + 1:end]]
                self.add(text, label)
                pos = end + 1
            else:
                literal.append(ch)
                pos += 1
        self.add("".join(literal))

    def build(self, locale: str = "-") -> Sample:
        return Sample("".join(self.parts), self.spans, locale)
