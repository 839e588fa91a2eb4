"""Transcript text -> the letter dictionary of stage 01 (``A-Z``, ``'``, space-separated words).

``normalise(text)`` returns ``(words, counts)`` or raises ``ValueError`` naming what it cannot
spell. In order:

* bracketed annotations ``[noise]``, ``(laughs)``, ``{breath}``, ``<unk>`` are dropped (counted as
  ``brackets``); an unclosed bracket is refused;
* accents are stripped (``café`` -> ``CAFE``, counted as ``accents``);
* numbers are spelled out (counted as ``numbers``): integers as cardinals (``1,995`` and ``1995``
  -> ``ONE THOUSAND NINE HUNDRED NINETY FIVE``), decimals digit by digit after ``POINT``, ordinals
  (``21st`` -> ``TWENTY FIRST``);
* symbols with a spoken form are spelled (``&`` -> ``AND``, ``%`` -> ``PERCENT``, ``+`` ``@`` ``=``;
  counted as ``symbols``); hyphens, slashes and underscores split words; punctuation that is not
  spoken (``.,;:!?"``) is dropped, and quotes that are not an apostrophe inside a word;
* anything else (``€``, ``*``, a letter of another script) is refused.
"""
import collections
import re
import unicodedata
from typing import Counter, List, Tuple

ONES = ("ZERO ONE TWO THREE FOUR FIVE SIX SEVEN EIGHT NINE TEN ELEVEN TWELVE THIRTEEN FOURTEEN "
        "FIFTEEN SIXTEEN SEVENTEEN EIGHTEEN NINETEEN").split()
TENS = "_ _ TWENTY THIRTY FORTY FIFTY SIXTY SEVENTY EIGHTY NINETY".split()
SCALES = [(10 ** 12, "TRILLION"), (10 ** 9, "BILLION"), (10 ** 6, "MILLION"), (1000, "THOUSAND")]
# ordinal of the last word of a cardinal
ORDINAL = {"ONE": "FIRST", "TWO": "SECOND", "THREE": "THIRD", "FIVE": "FIFTH", "EIGHT": "EIGHTH",
           "NINE": "NINTH", "TWELVE": "TWELFTH"}
SYMBOLS = {"&": "AND", "%": "PERCENT", "+": "PLUS", "@": "AT", "=": "EQUALS"}
SILENT = set('.,;:!?"“”„«»…') | {"\u2019", "\u2018", "'", "`"}  # quotes kept only inside a word
SPLITTERS = set("-–—/_")
BRACKETS = re.compile(r"\[[^\[\]]*\]|\([^()]*\)|\{[^{}]*\}|<[^<>]*>")
NUMBER = re.compile(r"\d+(?:,\d{3})*(?:\.\d+)?(?:(?:st|nd|rd|th)\b)?", re.IGNORECASE)
WORD = re.compile(r"[A-Z]+(?:'[A-Z]+)*")


def cardinal(n: int) -> List[str]:
    """Words of a non-negative integer: 105 -> ONE HUNDRED FIVE (no AND)."""
    if n < 0:
        raise ValueError(f"cardinal({n}): only non-negative integers")
    if n < 20:
        return [ONES[n]]
    if n < 100:
        return [TENS[n // 10]] + ([ONES[n % 10]] if n % 10 else [])
    if n < 1000:
        return [ONES[n // 100], "HUNDRED"] + (cardinal(n % 100) if n % 100 else [])
    for size, name in SCALES:
        if n >= size:
            if n // size >= 1000:
                raise ValueError(f"cardinal({n}): numbers of 10**15 and above are not spelled")
            return cardinal(n // size) + [name] + (cardinal(n % size) if n % size else [])
    raise AssertionError(n)


def ordinal(n: int) -> List[str]:
    """21 -> TWENTY FIRST, 40 -> FORTIETH, 100 -> ONE HUNDREDTH."""
    words = cardinal(n)
    last = words[-1]
    if last in ORDINAL:
        last = ORDINAL[last]
    elif last.endswith("Y"):
        last = last[:-1] + "IETH"
    else:
        last = last + "TH"
    return words[:-1] + [last]


def spell_number(token: str) -> List[str]:
    """``1,995`` / ``3.25`` / ``21st`` -> words."""
    suffix = token[-2:].lower() if token[-2:].isalpha() else ""
    digits = token[: len(token) - len(suffix)].replace(",", "")
    if suffix:
        if "." in digits:
            raise ValueError(f"{token!r} is neither an ordinal nor a decimal")
        return ordinal(int(digits))
    whole, _, frac = digits.partition(".")
    words = cardinal(int(whole))
    if frac:
        words += ["POINT"] + [ONES[int(d)] for d in frac]
    return words


def normalise(text: str) -> Tuple[str, Counter]:
    """-> (upper-case words of ``[A-Z]+('[A-Z]+)*`` joined by spaces, counts of what was changed).

    Raises ValueError naming the first character that has no spelling."""
    counts: Counter = collections.Counter()
    original = text.strip()
    text, n = BRACKETS.subn(" ", text)
    if n:
        counts["brackets"] += n
    for c in "[](){}<>":
        if c in text:
            raise ValueError(f"unmatched bracket {c!r} in {original!r}")
    stripped = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    if stripped != unicodedata.normalize("NFKD", text):
        counts["accents"] += 1
    text = stripped

    def number(match):
        counts["numbers"] += 1
        return f" {' '.join(spell_number(match.group(0)))} "

    text = NUMBER.sub(number, text)
    out = []
    for i, c in enumerate(text):
        if c.isascii() and c.isalpha():
            out.append(c.upper())
        elif c in SYMBOLS:
            counts["symbols"] += 1
            out.append(f" {SYMBOLS[c]} ")
        elif c in ("'", "\u2019") and 0 < i < len(text) - 1 and text[i - 1].isalpha() and text[i + 1].isalpha():
            out.append("'")  # an apostrophe inside a word: DON'T
        elif c in SILENT or c in SPLITTERS or c.isspace():
            out.append(" ")
        else:
            raise ValueError(f"character {c!r} (U+{ord(c):04X}) in {original!r} "
                             "has no spelling in the letter dictionary (A-Z and ')")
    words = "".join(out).split()
    assert all(WORD.fullmatch(w) for w in words), words
    return " ".join(words), counts
