"""benchmarks/steering.py: the --quick run scores every method at every coefficient, the c = 0 rows
are the base model's generation, and the judges compute what their docstrings say."""

from __future__ import annotations

import math

import pytest
import repeng  # noqa: F401  (the benchmarks extra README installs: missing means a broken install, not a skip)
import vaderSentiment  # noqa: F401
from scripts import load_script


def load_benchmark():
    return load_script("benchmarks/steering.py", "steering_benchmark")


@pytest.fixture(scope="module")
def bench():
    return load_benchmark()


def test_quick_run_scores_every_method_and_coefficient(bench, tmp_path, monkeypatch):
    calls = []
    generate_groups = bench.generate_groups

    def counted(*args, **kwargs):
        calls.append(args[3])  # the number of coefficient groups in this generate() call
        return generate_groups(*args, **kwargs)

    monkeypatch.setattr(bench, "generate_groups", counted)
    result = bench.main(["--quick", "--out", str(tmp_path)])
    settings = bench.quick_settings()
    response = tuple(a + bench.RESPONSE for a in settings.adapters)
    steered = (*settings.adapters, *response, "repeng")

    # one generate() per method and concept: base, prompting, repeng and each adapter (whole sequence and
    # response-only)
    assert len(calls) == len(settings.concepts) * (3 + 2 * len(settings.adapters))
    assert calls.count(len(settings.coeffs)) == len(settings.concepts) * len(steered)

    cells = result["cells"]
    for concept in settings.concepts:
        got = sorted((c["method"], c["coeff"]) for c in cells if c["concept"] == concept)
        want = [("base", 0.0)] + [("prompt", c) for c in (-2.0, -1.0, 1.0, 2.0)]
        want += [(m, c) for m in steered for c in settings.coeffs]
        assert got == sorted(want)

    for concept, part in result["concepts"].items():
        base = part["ids"]["base +0"]
        assert len(base) == settings.prompts
        for method in steered:
            # c = 0 (and repeng's multiplier 0) is the base model, token for token
            assert part["ids"][f"{method} +0"] == base, (concept, method)
            assert part["zero_equals_base"][method] == 1.0
            # and the trained steering does something at some other coefficient
            assert any(part["ids"][f"{method} {c:+g}"] != base for c in settings.coeffs if c), (concept, method)
        for adapter in settings.adapters:  # response-only: the first new token is the base model's
            for c in settings.coeffs:
                rows = part["ids"][f"{adapter}{bench.RESPONSE} {c:+g}"]
                assert [r[:1] for r in rows] == [r[:1] for r in base], (concept, adapter, c)

    for c in cells:
        assert all(math.isfinite(c[k]) for k in ("effect", "ci_low", "ci_high", "judge", "repetition")), c
        assert c["ci_low"] <= c["effect"] <= c["ci_high"], c
        assert 0.0 <= c["repetition"] <= 1.0 and 0.0 <= c["copied"] <= 1.0, c
        assert math.isnan(c["perplexity"]) or c["perplexity"] >= 1.0, c
        if c["coeff"] == 0.0:
            assert c["effect"] == c["ci_low"] == c["ci_high"] == 0.0, c
        assert (c["proxy"] is not None) == (c["method"] in settings.adapters), c
        if c["proxy"] is not None:
            assert math.isfinite(c["proxy"]), c

    pairs = {(s["concept"], s["method"], s["c"]) for s in result["symmetry"]}
    for concept in settings.concepts:
        assert {(concept, m, c) for m in steered for c in settings.coeffs if c > 0} <= pairs

    for name in ("steering_quick.json", "steering_tables_quick.md", "steering_effect_fluency_quick.png"):
        assert (tmp_path / name).stat().st_size > 0, name


def test_judges(bench):
    assert bench.sentiment_score("It was wonderful.") > 0.3
    assert bench.sentiment_score("It was terrible.") < -0.3
    assert bench.sentiment_score("It was on Tuesday.") == 0.0
    # 4 words: "consequently" (≥ 8 letters) against "i'm" (a contraction, counted once) and "!"
    assert bench.formality_score("Consequently, I'm here now!") == pytest.approx(100 * (1 - 1 - 1) / 4)
    # 5 words, three of ≥ 8 letters; the possessive 's is no contraction
    assert bench.formality_score("The committee's decision was unanimous") == pytest.approx(100 * 3 / 5)
    assert bench.formality_score("") == 0.0
    assert bench.repetition("horrible horrible horrible horrible") == (2, 3)
    assert bench.repetition("a b c") == (0, 2)
    assert bench.repetition("one") == (0, 0)
    concept = bench.CONCEPTS["formality"]
    assert bench.copies_training("It was thoroughly documented, sadly.", concept)  # a formal pair, word for word
    assert bench.copies_training("honestly a big deal", concept)  # a casual one
    assert not bench.copies_training("thoroughly and well documented", concept)


def test_held_out_prompts_and_judge_lexicon_are_separate_from_training(bench):
    held = set(bench.HELD_OUT)
    assert len(held) == len(bench.HELD_OUT) >= 40
    for concept in bench.CONCEPTS.values():
        assert not held & set(concept.train_prompts), concept.name
    # the register judge cannot be won by repeating a training phrase of the other pole: no formal
    # phrase holds a casual marker, no casual phrase a word the judge counts as formal (≥ 8 letters)
    formal, casual = ([bench._WORD.findall(pair[side].lower()) for pair in bench.FORMAL_PAIRS] for side in (0, 1))
    assert not {w for ws in formal for w in ws} & (bench.CASUAL_WORDS | bench.DEICTIC_WORDS)
    assert all(bench.formality_score(" ".join(ws)) > 0 for ws in formal)
    assert all(len(w) < 8 for ws in casual for w in ws)
