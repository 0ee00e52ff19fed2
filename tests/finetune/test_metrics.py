import pytest
from rouge_score import rouge_scorer
from sacrebleu import corpus_chrf, sentence_chrf

from finetune.eval.metrics import (
    BUILTIN_METRICS,
    chrf,
    exact_match,
    load_metric,
    normalize_answer,
    rouge_l,
    score_predictions,
    token_f1,
    tokenize,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Cat!", "cat"),
        ("  an   apple,  a day ", "apple day"),
        ("theatre", "theatre"),  # articles only as whole words
        ("ＡＢＣ　１２３", "abc 123"),  # NFKC: full-width letters and space
        ("Straße", "strasse"),  # casefold, not lower
        ("你好，世界！", "你好世界"),
        ("「東京」へ行く。", "東京へ行く"),
        ("Привет, Мир!", "привет мир"),
        ("مرحبا، بالعالم؟", "مرحبا بالعالم"),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_tokenize_splits_cjk_per_character_and_keeps_words():
    assert tokenize("我喜欢猫") == ["我", "喜", "欢", "猫"]
    assert tokenize("GPT4o模型很好") == ["gpt4o", "模", "型", "很", "好"]
    assert tokenize("ひらがなカナ") == ["ひ", "ら", "が", "な", "カ", "ナ"]
    assert tokenize("한국어 단어") == ["한", "국", "어", "단", "어"]
    assert tokenize("The Moscow-based, Москва!") == ["moscowbased", "москва"]


def test_exact_match():
    assert exact_match("The Cat!", "cat") == 1.0
    assert exact_match("cats", "cat") == 0.0
    assert exact_match("", "") == 1.0
    # numbers by value: the punctuation deleted, "1.5" would read "15"
    assert exact_match("1.5", "15") == 0.0 and exact_match("3.14", "314") == 0.0
    assert exact_match("$1,299.00", "1299") == 1.0 and exact_match("12.", "12") == 1.0
    assert exact_match("-0.50", "-.5") == 1.0 and exact_match("12 apples", "12") == 0.0


def test_token_f1_by_hand():
    # prediction {cat, sat}, reference {cat, sat, down}: P = 2/2, R = 2/3 -> F1 = 0.8
    assert token_f1("the cat sat", "cat sat down") == pytest.approx(0.8)
    # duplicate tokens count once per match: common = 1 "a1", P = 1/2, R = 1/1 -> 2/3
    assert token_f1("a1 a1", "a1") == pytest.approx(2 / 3)
    assert token_f1("dog", "cat") == 0.0
    assert token_f1("", "") == 1.0
    assert token_f1("the", "") == 1.0  # both empty after normalization
    assert token_f1("", "cat") == 0.0
    assert token_f1("cat", "") == 0.0


def test_rouge_l_by_hand():
    # pred: cat sat on mat today (5), ref: cat was on mat (4); LCS = cat on mat = 3
    # P = 3/5, R = 3/4 -> F = 2 * 0.6 * 0.75 / 1.35 = 2/3
    assert rouge_l("The cat sat on the mat today", "the cat was on the mat") == pytest.approx(2 / 3)
    # same bag of words, different order: F1 is 1, ROUGE-L is not (LCS = 2 of 3)
    assert token_f1("mat cat sat", "cat sat mat") == 1.0
    assert rouge_l("mat cat sat", "cat sat mat") == pytest.approx(2 / 3)
    assert rouge_l("", "") == 1.0
    assert rouge_l("", "cat") == 0.0


def test_chrf_scale_and_agreement_with_sacrebleu():
    assert chrf("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert chrf("xyz", "abc") == 0.0
    value = chrf("the cat sat on a mat", "the cat is on the mat")
    assert 0.0 < value < 1.0
    assert value == pytest.approx(
        sentence_chrf("the cat sat on a mat", ["the cat is on the mat"]).score / 100
    )


def test_chinese_scored_per_character():
    assert token_f1("我喜欢猫", "我喜欢狗") == pytest.approx(0.75)
    assert rouge_l("我喜欢猫", "我喜欢狗") == pytest.approx(0.75)
    assert exact_match("我喜欢猫", "我喜欢狗") == 0.0


def test_rouge_score_default_tokenizer_scores_chinese_zero():
    # Why finetune.eval.metrics.tokenize exists: rouge-score keeps only [a-z0-9] by default.
    default = rouge_scorer.RougeScorer(["rougeL"])
    assert default.score("我喜欢狗", "我喜欢猫")["rougeL"].fmeasure == 0.0
    assert default.score("我喜欢猫", "我喜欢猫")["rougeL"].fmeasure == 0.0


def test_russian_and_arabic_score_above_zero():
    # Russian: same words, another order -> F1 1, ROUGE-L LCS 2 of 3
    assert token_f1("Москва столица России", "столица России Москва") == pytest.approx(1.0)
    assert rouge_l("Москва столица России", "столица России Москва") == pytest.approx(2 / 3)
    # Arabic: 4 predicted words, the 3 reference words among them in order: P = 3/4, R = 1 -> 6/7
    assert token_f1("القطة جلست على السجادة", "القطة على السجادة") == pytest.approx(6 / 7)
    assert rouge_l("القطة جلست على السجادة", "القطة على السجادة") == pytest.approx(6 / 7)
    assert chrf("القطة جلست على السجادة", "القطة على السجادة") > 0.5


def test_load_metric_builtins_and_errors(tmp_path):
    assert set(BUILTIN_METRICS) == {"exact_match", "f1", "rouge_l", "chrf"}
    assert load_metric("f1") is token_f1
    with pytest.raises(ValueError, match=r"'bleu'.*chrf, exact_match, f1, rouge_l"):
        load_metric("bleu")
    with pytest.raises(ValueError, match=r"'no_such_module_xyz:fn'.*not importable"):
        load_metric("no_such_module_xyz:fn")
    with pytest.raises(ValueError, match=r"'math:nope'.*no attribute 'nope'"):
        load_metric("math:nope")
    with pytest.raises(ValueError, match=r"'math:pi'.*not a function"):
        load_metric("math:pi")
    with pytest.raises(ValueError, match="does not exist"):
        load_metric(f"{tmp_path}/missing.py:fn")
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('bad import')\n")
    with pytest.raises(ValueError, match=r"broken.py:fn'.*RuntimeError: bad import"):
        load_metric(f"{broken}:fn")
    assert load_metric("os.path:join")("a", "b") == "a/b"


USER_METRICS = """
def length_ratio(prediction, reference):
    if reference == "boom":
        raise RuntimeError("cannot score this one")
    return len(prediction) / len(reference)


def lengths(prediction, reference):
    return {"pred": len(prediction), "ref": len(reference)}
"""


def test_score_predictions_counts_problems_without_crashing(tmp_path):
    path = tmp_path / "my_metrics.py"
    path.write_text(USER_METRICS)
    predictions = ["Paris", "   ", "x", "boom", None]
    references = ["paris", "London", 42, "boom", "Rome"]
    metrics = ["exact_match", "f1", "chrf", f"{path}:length_ratio", f"{path}:lengths"]

    rows, agg = score_predictions(predictions, references, metrics)

    assert len(rows) == 5
    assert rows[0] == {
        "exact_match": 1.0,
        "f1": 1.0,
        "chrf": pytest.approx(sentence_chrf("Paris", ["paris"]).score / 100),
        "length_ratio": 1.0,
        "lengths.pred": 5.0,
        "lengths.ref": 5.0,
    }
    assert rows[1]["exact_match"] == 0.0 and rows[1]["f1"] == 0.0 and rows[1]["chrf"] == 0.0
    assert rows[2] == {"error": "reference is not a string (got int)"}
    assert rows[3]["exact_match"] == 1.0
    assert "length_ratio" not in rows[3]
    assert rows[3]["error"] == "length_ratio: RuntimeError: cannot score this one"
    assert rows[4]["f1"] == 0.0  # None prediction is scored as empty

    assert agg["n"] == 5
    assert agg["n_scored"] == 4
    assert agg["n_invalid_reference"] == 1
    assert agg["n_empty_prediction"] == 2
    assert agg["n_metric_errors"] == 1
    assert agg["exact_match"] == pytest.approx(2 / 4)
    # length_ratio scored on 3 examples: 5/5, 3/6, 0/4
    assert agg["length_ratio"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert agg["lengths.ref"] == pytest.approx((5 + 6 + 4 + 4) / 4)
    expected_corpus = corpus_chrf(["Paris", "   ", "boom", ""], [["paris", "London", "boom", "Rome"]])
    assert agg["chrf_corpus"] == pytest.approx(expected_corpus.score / 100)


def test_score_predictions_defaults_and_mismatched_lengths():
    rows, agg = score_predictions(["the cat sat"], ["cat sat down"])
    assert set(rows[0]) == {"exact_match", "f1", "rouge_l", "chrf"}
    assert agg["f1"] == pytest.approx(0.8)
    assert agg["rouge_l"] == pytest.approx(0.8)
    assert agg["n_metric_errors"] == 0
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        score_predictions(["a", "b"], ["a"])


def test_user_metric_returning_non_number_is_an_error(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("def bad(p, r):\n    return 'high'\n")
    rows, agg = score_predictions(["a"], ["a"], ["f1", f"{path}:bad"])
    assert agg["n_metric_errors"] == 1
    assert "bad: TypeError" in rows[0]["error"]
    assert "bad" not in agg
