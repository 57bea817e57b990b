"""Text normalisation and tokenisation for scoring model outputs in any language.

Normalisation (:func:`normalize_text`), in this order:

1. Unicode NFKC (full-width digits and letters become ASCII, half-width katakana full-width);
2. a number written with the fraction ".0" loses it (`"3.0"` → `"3"`: MKQA writes numeric answers so; `"1.000"`
   stays, a thousands separator in many languages);
3. case folding;
4. punctuation and symbols (Unicode categories `P*` and `S*`) are deleted, as SQuAD's evaluation deletes ASCII
   punctuation (`"U.S."` → `"us"`, `"ポール・ザーディン"` → `"ポールザーディン"`); letters, combining marks
   (Devanagari and Thai vowel signs) and digits stay;
5. for English only, the articles "a", "an", "the" are removed (SQuAD);
6. runs of white space become one space; leading and trailing space is dropped.

Tokenisation (:func:`tokenize`) splits on white space, and additionally makes every character of a script written
without spaces between words its own token: Han (Chinese characters, Japanese kanji), hiragana, katakana, Thai, Lao,
Khmer and Myanmar. A combining mark stays with the character before it (a Thai vowel or tone mark is part of its
consonant's token). Hangul is written with spaces, so Korean is split into words. Mixed runs split at the script
boundary: `"2015年"` → `["2015", "年"]`.
"""

from __future__ import annotations

import re
import unicodedata

# Unicode blocks of scripts written without spaces between words: (first, last) code points, inclusive.
SPACELESS_RANGES: tuple[tuple[int, int], ...] = (
    (0x0E00, 0x0E7F),  # Thai
    (0x0E80, 0x0EFF),  # Lao
    (0x1000, 0x109F),  # Myanmar
    (0x1780, 0x17FF),  # Khmer
    (0x3000, 0x303F),  # CJK symbols (the iteration mark 々, the ideographic zero 〇; punctuation is removed before)
    (0x3040, 0x309F),  # Hiragana
    (0x30A0, 0x30FF),  # Katakana
    (0x3100, 0x312F),  # Bopomofo
    (0x31F0, 0x31FF),  # Katakana phonetic extensions
    (0x3400, 0x4DBF),  # CJK unified ideographs extension A
    (0x4E00, 0x9FFF),  # CJK unified ideographs
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
    (0xFF66, 0xFF9F),  # half-width katakana
    (0x20000, 0x323AF),  # CJK unified ideographs extensions B to H, compatibility supplement
)

ENGLISH_ARTICLES = re.compile(r"\b(a|an|the)\b")
_FLOAT_WITH_ZERO_FRACTION = re.compile(r"(?<![\d.])(\d+)\.0(?!\.?\d)")


def is_spaceless_char(char: str) -> bool:
    """Whether `char` belongs to a script written without spaces between words (see :data:`SPACELESS_RANGES`)."""
    code = ord(char)
    return any(first <= code <= last for first, last in SPACELESS_RANGES)


def normalize_text(text: str, language: str | None = None) -> str:
    """`text` normalised for comparison (see the module docstring); `language` is an ISO code such as `"en"`."""
    text = unicodedata.normalize("NFKC", text)
    text = _FLOAT_WITH_ZERO_FRACTION.sub(r"\1", text)
    text = text.casefold()
    text = "".join(char for char in text if unicodedata.category(char)[0] not in "PS")
    if language == "en":
        text = ENGLISH_ARTICLES.sub(" ", text)
    return " ".join(text.split())


def tokenize(text: str) -> list[str]:
    """Word tokens of (already normalised) `text`; one token per character of spaceless scripts."""
    tokens: list[str] = []
    current = ""
    current_is_spaceless = False
    for char in text:
        if char.isspace():
            if current:
                tokens.append(current)
            current, current_is_spaceless = "", False
        elif current_is_spaceless and unicodedata.category(char).startswith("M"):
            current += char
        elif is_spaceless_char(char):
            if current:
                tokens.append(current)
            current, current_is_spaceless = char, True
        elif current_is_spaceless:
            tokens.append(current)
            current, current_is_spaceless = char, False
        else:
            current += char
    if current:
        tokens.append(current)
    return tokens


def normalized_tokens(text: str, language: str | None = None) -> list[str]:
    """`tokenize(normalize_text(text, language))`."""
    return tokenize(normalize_text(text, language))
