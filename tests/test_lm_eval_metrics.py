"""The generative tasks' metrics (benchmarks/tasks/answer_metrics.py) on hand-made cases, including scripts written
without spaces (zh, ja, th)."""

from __future__ import annotations

import pytest
from answer_metrics import contains_answer, exact_match, rouge_l_f1, token_f1
from text_normalization import normalize_text, tokenize

# ------------------------------------------------------------------------------------------------ normalisation


@pytest.mark.parametrize(
    ("text", "language", "expected"),
    [
        ("The U.S.  Army!", "en", "us army"),
        ("Der Hund, die Katze.", "de", "der hund die katze"),  # articles are removed in English only
        ("ＡＢＣ　１２３", None, "abc 123"),  # full-width forms (NFKC)
        ("3.0", None, "3"),  # MKQA's numeric answers
        ("It was 8.0.", "en", "it was 8"),
        ("1.000 Euro", "de", "1000 euro"),  # a thousands separator is not a fraction
        ("北京，中国。", "zh", "北京中国"),
        ("ポール・ザーディン", "ja", "ポールザーディン"),
        ("नमस्ते, दुनिया।", "hi", "नमस्ते दुनिया"),  # vowel signs and virama stay, the danda goes
        ("Hà Nội là thủ đô.", "vi", "hà nội là thủ đô"),
    ],
)
def test_normalize_text(text, language, expected):
    assert normalize_text(text, language) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("hello world", ["hello", "world"]),
        ("北京是首都", ["北", "京", "是", "首", "都"]),
        ("2015年冬", ["2015", "年", "冬"]),
        ("東京タワー", ["東", "京", "タ", "ワ", "ー"]),
        ("สวัสดี", ["ส", "วั", "ส", "ดี"]),  # a Thai vowel or tone mark stays with its consonant
        ("서울은 수도", ["서울은", "수도"]),  # Korean is written with spaces
        ("abc北京def", ["abc", "北", "京", "def"]),
    ],
)
def test_tokenize(text, expected):
    assert tokenize(text) == expected


# ------------------------------------------------------------------------------------------------ QA metrics


def test_exact_match():
    assert exact_match("Paris.", "paris") == 1.0
    assert exact_match("The Paris", "Paris", "en") == 1.0
    assert exact_match("Paris, France", "Paris") == 0.0
    assert exact_match("北京。", "北京", "zh") == 1.0
    assert exact_match("Berlin", ["Bonn", "berlin"]) == 1.0


@pytest.mark.parametrize(
    ("prediction", "answers", "language", "expected"),
    [
        ("the cat sat", "cat sat on mat", "en", 2 / 3),  # P = 1, R = 1/2
        ("Paris", "Paris", "en", 1.0),
        ("London", "Paris", "en", 0.0),
        ("北京市", "北京", "zh", 0.8),  # characters: P = 2/3, R = 1
        ("東京タワーです", "東京タワー", "ja", 2 * (5 / 7) / (5 / 7 + 1)),
        ("กรุงเทพ", "กรุงเทพมหานคร", "th", 2 / 3),  # 6 of 12 clusters: P = 1, R = 1/2
        ("one two", ["three", "one two three four"], "en", 2 / 3),  # the best answer counts
        ("", "", "en", 1.0),
        ("", "Paris", "en", 0.0),
    ],
)
def test_token_f1(prediction, answers, language, expected):
    assert token_f1(prediction, answers, language) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("prediction", "answers", "language", "expected"),
    [
        ("The answer is Paris, France.", ["Paris"], "en", 1.0),
        ("I think it was in 1999.", ["1999"], "en", 1.0),
        ("19990", ["1999"], "en", 0.0),  # whole tokens only in spaced scripts
        ("The restart", ["art"], "en", 0.0),
        ("There are 3 seasons", ["3.0"], "en", 1.0),
        ("Die Hauptstadt ist Berlin", ["Bonn", "Berlin"], "de", 1.0),
        ("答案是保罗·泽丁。", ["保罗·泽丁"], "zh", 1.0),
        ("ポール・ザーディンです", ["ポール・ザーディン"], "ja", 1.0),
        ("คำตอบคือสี่", ["สี่"], "th", 1.0),
        ("คำตอบคือสาม", ["สี่"], "th", 0.0),
        ("anything", [""], "en", 0.0),  # an answer that normalises to nothing never matches
    ],
)
def test_contains_answer(prediction, answers, language, expected):
    assert contains_answer(prediction, answers, language) == expected


# ------------------------------------------------------------------------------------------------ ROUGE-L


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("the cat sat on the mat", "the cat is on the mat", 5 / 6),  # LCS "the cat on the mat"
        ("The cat.", "the cat", 1.0),
        ("dog", "cat", 0.0),
        ("", "cat", 0.0),
        ("我喜欢猫", "我很喜欢狗", 2 * 0.75 * 0.6 / 1.35),  # LCS 我喜欢: P = 3/4, R = 3/5
        ("भारत ने मैच जीता", "भारत ने आज मैच जीता", 2 * 1 * 0.8 / 1.8),  # P = 4/4, R = 4/5
        ("Hà Nội mưa to", "Hôm nay Hà Nội mưa", 2 * 0.75 * 0.6 / 1.35),
        ("مرحبا بالعالم", "مرحبا بالعالم الجميل", 0.8),
    ],
)
def test_rouge_l_f1(prediction, reference, expected):
    assert rouge_l_f1(prediction, reference) == pytest.approx(expected)


def test_rouge_l_is_symmetric_in_f1():
    assert rouge_l_f1("a b c d", "a c e") == pytest.approx(rouge_l_f1("a c e", "a b c d"))
