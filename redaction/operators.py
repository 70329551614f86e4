"""Operators: what a detected span becomes in the output text.

- replace: a tag, `<EMAIL_ADDRESS>` by default (`replace_template`);
- mask: every character but whitespace becomes `mask_char`, except the last
  `mask_keep_last[TYPE]` characters;
- hash: `<TYPE:0123abcd...>`, the first `hash_length` hex digits of HMAC-SHA256(key,
  normalised value). The same value under the same key always gives the same token (joins
  and counts still work on redacted data); without the key it cannot be reversed, not even
  by trying every phone number.
"""

from __future__ import annotations

import hashlib
import hmac

from redaction.settings import RedactionSettings

_DIGIT_TYPES = frozenset({"PHONE_NUMBER", "CREDIT_CARD", "US_SSN", "IBAN_CODE"})


def normalise(entity_type: str, value: str) -> str:
    """The same value written differently hashes the same ("+1 415-555 1234" = "+14155551234")."""
    if entity_type in _DIGIT_TYPES:
        return "".join(ch for ch in value if ch.isalnum()).upper()
    if entity_type in ("EMAIL_ADDRESS", "PERSON"):
        return " ".join(value.split()).casefold()
    return value


class Operators:
    def __init__(self, settings: RedactionSettings):
        self.settings = settings
        self._template = settings.replace_template
        key = settings.hash_key.get_secret_value() if settings.hash_key is not None else ""
        self._key = key.encode("utf-8")
        self._length = settings.hash_length
        self._mask = settings.mask_char
        self._keep = settings.mask_keep_last
        self._ops = {}
        self._replaced: dict[str, str] = {}  # the replace tag of each type (a format call per span otherwise)

    def operator(self, entity_type: str) -> str:
        op = self._ops.get(entity_type)
        if op is None:
            op = self._ops[entity_type] = self.settings.operator_for(entity_type)
        return op

    def apply(self, entity_type: str, value: str) -> str:
        op = self.operator(entity_type)
        if op == "replace":
            tag = self._replaced.get(entity_type)
            if tag is None:
                tag = self._replaced[entity_type] = self._template.format(type=entity_type)
            return tag
        if op == "mask":
            keep = min(self._keep.get(entity_type, 0), max(0, len(value) - 4))
            cut = len(value) - keep
            return "".join(ch if ch.isspace() else self._mask for ch in value[:cut]) + value[cut:]
        if op == "hash":
            if not self._key:
                raise ValueError("hash operator without hash_key")
            digest = hmac.new(self._key, normalise(entity_type, value).encode("utf-8", "surrogatepass"),
                              hashlib.sha256).hexdigest()
            return f"<{entity_type}:{digest[:self._length]}>"
        raise ValueError(f"unknown operator {op!r}")
