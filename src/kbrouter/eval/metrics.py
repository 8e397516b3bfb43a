"""Answer metrics: F1-Recall (the paper's headline metric), exact match, token F1, yes/no accuracy.

F1-Recall (method.md sec. 4): normalise the prediction and every gold answer (VQA-style),
tokenise, compute token-multiset precision/recall/F1 against each gold, pick the gold with the
highest F1 (the first one on ties) and return **that gold's recall**. A dataset's score is
100 x the mean over questions.

Normalisation, in order:

1. ``str()`` of the value, newlines/tabs become spaces, surrounding whitespace is stripped.
2. Punctuation: each of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is deleted when it stands
   next to a space in the text (or the text contains a ``digit,digit`` pattern), otherwise it is
   replaced by a space. Both conditions look at the text as it was before this step.
3. Periods not followed by a digit are deleted (``3.5`` keeps its period, ``U.S.`` becomes ``US``).
4. Lower-casing, whitespace splitting; number words map to digits (``two`` -> ``2``); the
   articles ``an`` and ``the`` are dropped (``a`` is kept); contractions written without an
   apostrophe are expanded (``dont`` -> ``don't``).
5. Tokenising with NLTK's Treebank word tokenizer
   (``word_tokenize(text, preserve_line=True)``, which needs no ``punkt`` data); punctuation
   tokens are dropped.

Two modes. ``paper_compat=True`` reproduces the released evaluation code's behaviour, quirks
included; the default mode fixes the quirks. What "fixed" means, quirk by quirk:

* **Period stripping.** Paper: only the first 32 periods are deleted (the released code passes
  ``re.UNICODE`` positionally to ``re.sub``, where it is the *count*, 32). Fixed: every period
  not followed by a digit is deleted.
* **Gold ``None``.** Paper: ``str(None)`` -> ``"None"`` -> ``"0"``, and the word ``none``
  always becomes ``0`` (so OpenWikiTable's 210 null answers ``"None"`` equal a prediction
  ``"0"``). Fixed: missing golds (``None``, NaN) are dropped -- a missing gold is not an
  answer -- and ``none`` is not a number word, so it stays ``none`` on both sides.
* **Punctuation tokens.** Paper: a token is dropped when it is a *substring* of ``,.?!:;'"``
  (so ``«`` or ``–`` survive as tokens). Fixed: a token is dropped when every character is
  Unicode punctuation.
* **Contraction table.** Paper: includes the reversed entry ``somebody'd`` -> ``somebodyd``.
  Fixed: ``somebodyd`` -> ``somebody'd``.

Everything else (the ``digit,digit`` rule, article and number-word handling, tokenizer, best-gold
selection, empty prediction -> 0) is identical in both modes.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

__all__ = [
    "PRF",
    "exact_match",
    "f1_recall",
    "f1_recall_detail",
    "normalize_answer",
    "normalize_golds",
    "token_f1",
    "tokenize_answer",
    "yes_no_accuracy",
    "yes_no_label",
]

_PUNCT = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# The released pattern is ``(?!<=\d)(\.)(?!\d)``: its first group is a (mistyped) lookahead for
# the literal "<=" + digit, so in effect it deletes periods not followed by a digit.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_RELEASED_PERIOD_COUNT = 32  # re.UNICODE passed positionally as re.sub's ``count``

_NUMBER_WORDS = {
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = frozenset({"an", "the"})


def _build_contractions() -> dict[str, str]:
    """Apostrophe-less spellings -> contractions (the VQA evaluation's table, lower-case)."""
    table: dict[str, str] = {}
    # Simple words: the key is the value without its apostrophes.
    simple = [
        "ain't",
        "aren't",
        "can't",
        "could've",
        "couldn't",
        "didn't",
        "doesn't",
        "don't",
        "hadn't",
        "hasn't",
        "haven't",
        "he'd",
        "he's",
        "how'd",
        "how'll",
        "how's",
        "isn't",
        "it'd",
        "it'll",
        "ma'am",
        "mightn't",
        "might've",
        "mustn't",
        "must've",
        "needn't",
        "not've",
        "o'clock",
        "oughtn't",
        "shan't",
        "should've",
        "shouldn't",
        "somebody'll",
        "somebody's",
        "someone'd",
        "someone'll",
        "someone's",
        "something'd",
        "something'll",
        "that's",
        "there'd",
        "there're",
        "there's",
        "they'd",
        "they'll",
        "they're",
        "they've",
        "wasn't",
        "we've",
        "weren't",
        "what'll",
        "what're",
        "what's",
        "what've",
        "when's",
        "where'd",
        "where's",
        "where've",
        "who'd",
        "who'll",
        "who's",
        "who've",
        "why'll",
        "why're",
        "why's",
        "won't",
        "would've",
        "wouldn't",
        "y'all",
        "you'd",
        "you'll",
        "you're",
        "you've",
    ]
    for word in simple:
        table[word.replace("'", "")] = word
    # Double contractions: both the fully and the partially apostrophe-less spellings.
    double = [
        "couldn't've",
        "hadn't've",
        "he'd've",
        "it'd've",
        "mightn't've",
        "she'd've",
        "shouldn't've",
        "somebody'd've",
        "someone'd've",
        "something'd've",
        "there'd've",
        "they'd've",
        "we'd've",
        "who'd've",
        "wouldn't've",
        "you'd've",
    ]
    for word in double:
        stem, _, _ = word.rpartition("'")  # "couldn't've" -> "couldn't"
        table[stem.replace("'", "") + "'ve"] = word  # couldnt've
        table[stem + "ve"] = word  # couldn'tve
    for key in ("yall'd've", "y'alld've", "y'all'dve"):
        table[key] = "y'all'd've"
    table["yall'll"] = "y'all'll"
    table["y'allll"] = "y'all'll"
    # Odd entries of the original table.
    table["twas"] = "'twas"
    table["ow's'at"] = "'ow's'at"
    table["'ows'at"] = "'ow's'at"
    table["'ow'sat"] = "'ow's'at"
    table["let's"] = "let's"
    table["she's"] = "she's"
    return table


_CONTRACTIONS = _build_contractions()
_CONTRACTIONS_PAPER = {**_CONTRACTIONS, "somebody'd": "somebodyd"}
_CONTRACTIONS_FIXED = {**_CONTRACTIONS, "somebodyd": "somebody'd"}

_PAPER_PUNCT_TOKENS = ",.?!:;'\""


def _process_punctuation(text: str, paper_compat: bool) -> str:
    out = text
    has_digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in _PUNCT:
        if has_digit_comma or (p + " ") in text or (" " + p) in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=_RELEASED_PERIOD_COUNT if paper_compat else 0)


def _process_words(text: str, paper_compat: bool) -> str:
    numbers = {**_NUMBER_WORDS, "none": "0"} if paper_compat else _NUMBER_WORDS
    contractions = _CONTRACTIONS_PAPER if paper_compat else _CONTRACTIONS_FIXED
    words = [numbers.get(w, w) for w in text.lower().split()]
    words = [contractions.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def normalize_answer(text: Any, paper_compat: bool = False) -> str:
    """VQA-style normalisation of one answer string (see the module docstring).

    Non-string values (ints in Dyn-VQA golds) are converted with ``str()``.
    """
    s = str(text).replace("\n", " ").replace("\t", " ").strip()
    return _process_words(_process_punctuation(s, paper_compat), paper_compat)


@lru_cache(maxsize=1)
def _word_tokenize():  # imported lazily: nltk takes ~0.3 s to import
    from nltk.tokenize import word_tokenize

    return word_tokenize


def _is_punct_token(tok: str, paper_compat: bool) -> bool:
    if paper_compat:
        return tok in _PAPER_PUNCT_TOKENS  # substring test, as released
    return all(unicodedata.category(c).startswith("P") for c in tok)


def tokenize_answer(normalized: str, paper_compat: bool = False) -> list[str]:
    """Tokenise an already-normalised answer and drop punctuation tokens."""
    if not normalized:
        return []
    toks = _word_tokenize()(normalized.lower(), preserve_line=True)
    return [t for t in toks if not _is_punct_token(t, paper_compat)]


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def normalize_golds(golds: Iterable[Any] | Any, paper_compat: bool = False) -> list[str]:
    """Normalise a gold list. A bare string counts as a one-element list.

    Default mode drops missing golds (``None``, NaN); paper mode keeps them as ``str()``.
    """
    return [normalize_answer(g, paper_compat) for g in _gold_values(golds, paper_compat)]


def _gold_values(golds: Iterable[Any] | Any, paper_compat: bool) -> list[Any]:
    if isinstance(golds, str) or not isinstance(golds, Iterable):
        golds = [golds]
    return [
        g if isinstance(g, str) else str(g) for g in golds if paper_compat or not _is_missing(g)
    ]


@lru_cache(maxsize=65536)
def _gold_tokens(gold: str, paper_compat: bool) -> tuple[str, ...]:
    # Cached: InfoSeek numeric golds expand to thousands of candidates per question.
    return tuple(tokenize_answer(normalize_answer(gold, paper_compat), paper_compat))


@dataclass(frozen=True)
class PRF:
    """Token precision/recall/F1 against the best gold (``gold_index`` -1: no overlap)."""

    precision: float = 0.0
    recall: float = 0.0
    f1: float = 0.0
    gold_index: int = -1


def _prf(gold_toks: Sequence[str], pred_toks: Sequence[str]) -> tuple[float, float, float]:
    if not gold_toks or not pred_toks:
        return 0.0, 0.0, 0.0
    same = sum((Counter(gold_toks) & Counter(pred_toks)).values())
    if same == 0:
        return 0.0, 0.0, 0.0
    p = same / len(pred_toks)
    r = same / len(gold_toks)
    return p, r, 2 * p * r / (p + r)


def f1_recall_detail(
    prediction: str | None, golds: Iterable[Any] | Any, paper_compat: bool = False
) -> PRF:
    """Precision, recall and F1 of the prediction against the best-F1 gold."""
    if prediction is None or prediction == "":
        return PRF()
    pred = normalize_answer(prediction, paper_compat)
    if pred == "":
        return PRF()
    pred_toks = tokenize_answer(pred, paper_compat)
    best = PRF()
    for i, gold in enumerate(_gold_values(golds, paper_compat)):
        p, r, f = _prf(_gold_tokens(gold, paper_compat), pred_toks)
        if f > best.f1:  # strictly greater: the first gold wins ties
            best = PRF(p, r, f, i)
    return best


def f1_recall(
    prediction: str | None, golds: Iterable[Any] | Any, paper_compat: bool = False
) -> float:
    """F1-Recall of one prediction in [0, 1]: the recall of the gold with the best token F1."""
    return f1_recall_detail(prediction, golds, paper_compat).recall


def token_f1(
    prediction: str | None, golds: Iterable[Any] | Any, paper_compat: bool = False
) -> float:
    """SQuAD-style token F1 (with this module's normalisation), best over golds."""
    return f1_recall_detail(prediction, golds, paper_compat).f1


def exact_match(
    prediction: str | None, golds: Iterable[Any] | Any, paper_compat: bool = False
) -> float:
    """1.0 if the normalised token sequence of the prediction equals that of any gold."""
    if prediction is None:
        return 0.0
    pred = tokenize_answer(normalize_answer(prediction, paper_compat), paper_compat)
    if not pred:
        return 0.0
    for gold in _gold_values(golds, paper_compat):
        if list(_gold_tokens(gold, paper_compat)) == pred:
            return 1.0
    return 0.0


_YES = frozenset({"yes", "true", "correct", "right", "yeah", "yep"})
_NO = frozenset({"no", "false", "incorrect", "wrong", "not", "nope"})


def yes_no_label(text: str | None) -> str | None:
    """``"yes"``/``"no"`` from the first yes-like or no-like token of a text, else None."""
    if not text:
        return None
    for tok in tokenize_answer(normalize_answer(text)):
        if tok in _YES:
            return "yes"
        if tok in _NO or tok == "n't":
            return "no"
    return None


def yes_no_accuracy(prediction: str | None, golds: Iterable[Any] | Any) -> float | None:
    """Accuracy for yes/no questions; None when no gold is a yes/no answer."""
    gold_labels = {yes_no_label(str(g)) for g in normalize_golds(golds)} - {None}
    if len(gold_labels) != 1:
        return None
    return float(yes_no_label(prediction) in gold_labels)
