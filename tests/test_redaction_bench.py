"""`gatewatch bench redaction`: the corpus is labeled right, scoring is right, and a tiny
run prints the table and a JSON last line with the promised keys."""

from __future__ import annotations

import json

from click.testing import CliRunner

from ops.bench.redaction import EVAL_TYPES, Sample, generate_corpus, redaction, score


def test_corpus_is_labeled_and_reproducible():
    one = generate_corpus(120, seed=3, pii_ratio=0.5)
    two = generate_corpus(120, seed=3, pii_ratio=0.5)
    assert [s.text for s in one] == [s.text for s in two]
    labels = {label for s in one for label, _, _ in s.spans}
    assert labels <= set(EVAL_TYPES) and len(labels) >= 6
    for sample in one:
        for label, start, end in sample.spans:
            value = sample.text[start:end]
            assert value and value == value.strip(), (label, value)
    assert 0.3 < sum(s.has_pii for s in one) / len(one) < 0.7
    words = sum(len(s.text.split()) for s in one) / len(one)
    assert 60 < words < 600


def test_score_counts_overlaps_per_type():
    samples = [Sample("call Ana on 555", [("PERSON", 5, 8), ("PHONE_NUMBER", 12, 15)]), Sample("clean text")]
    predictions = [[("PERSON", 5, 8), ("EMAIL_ADDRESS", 0, 4)], []]
    result = score(samples, predictions)
    assert result["entities"]["PERSON"] == {"gold": 1, "recall": 1.0, "precision": 1.0}
    assert result["entities"]["PHONE_NUMBER"]["recall"] == 0.0
    assert result["entities"]["EMAIL_ADDRESS"]["precision"] == 0.0
    assert result["clean_untouched"] == 1.0 and result["pii_texts_fully_covered"] == 0.0


def test_tiny_bench_run_ends_with_json():
    result = CliRunner().invoke(redaction, ["--texts", "40", "--eval-texts", "20", "--procs", "1",
                                            "--engines", "presidio_patterns,ours_fast"])
    assert result.exit_code == 0, result.output
    last = json.loads(result.output.strip().splitlines()[-1])
    assert last["ours_texts_per_s"] > 0 and last["presidio_patterns_texts_per_s"] > 0
    assert last["presidio_texts_per_s"] is None  # not run here
    assert set(last["engines"]["ours_fast"]["entities"]) == set(EVAL_TYPES)
    assert "texts/s" in result.output and "PERSON" in result.output


def test_realworld_corpus_is_labeled_by_its_generator_in_many_locales():
    one = generate_corpus(400, seed=5, pii_ratio=0.5, kind="realworld")
    two = generate_corpus(400, seed=5, pii_ratio=0.5, kind="realworld")
    assert [s.text for s in one] == [s.text for s in two]
    assert {label for s in one for label, _, _ in s.spans} == set(EVAL_TYPES)
    assert len({s.locale for s in one}) >= 10
    for sample in one:
        for label, start, end in sample.spans:
            value = sample.text[start:end]
            assert value and value == value.strip(), (label, value)
    clean = " ".join(s.text for s in one if not s.has_pii)
    # lookalikes are in the clean texts: versions, ISBNs, digests, placeholders, abbreviations
    assert "Chrome/" in clean and "ISBN" in clean and "sha256" in clean and "OPENAI_API_KEY=" in clean
