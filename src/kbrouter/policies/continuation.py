"""Multi-hop continuation: when may a step-wise router stop?

Small routers stop too early on multi-hop questions: after identifying the entity a question is
about ("Flag of Australia"), the prompted 0.5B router decides it knows enough and the final
answer repeats the entity. The rule here is a setting of the R1-Router family of policies
(``continue_after_entity``), checked before a stop is accepted:

* the latest hop's answer **names an entity** (a short answer that is not a refusal), and
* the question **asks about something beyond it**: at least ``min_uncovered`` content words of
  the question (stop words removed, plural folded) appear neither in any sub-question asked so
  far nor in any answer. "In which city is the national capital of the country whose flag is
  shown?" after "What is shown in the image?" -> "Flag of Australia" leaves *city, national,
  capital, country* uncovered; "Which architect designed the buildings of Brasília?" after "Who
  designed the buildings of Brasília?" -> "Oscar Niemeyer" leaves only *architect*.

Then the router is asked to go on (an LLM router is re-asked without the grammar's stop branch,
or with a corrective message when there is no grammar; a learned router takes its best KB), at
most ``max_continuations`` times per question (``Step.continued`` marks such a step). The
sub-question of a continued step, or of the step right after the image was identified, must be
*about* the entity: if it
mentions nothing of the answer that the question does not already say (the 0.5B router asked
"Which city is shown in the image?" after "Flag of Australia"), it is replaced by the question
with the entity in brackets, which retrieves by both
(:func:`anchored_sub_question`). The trace notes say so.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

from kbrouter.policies.prompts import Hop

__all__ = [
    "anchored_sub_question",
    "asks_whole_question",
    "content_words",
    "continuation_reason",
    "is_copied_text",
    "is_entity_answer",
    "is_refusal",
    "uncovered_words",
]

# words that refer to the question's own image or to asking, not to what is asked about
_QUESTION_WORDS = frozenset(
    {
        "image",
        "picture",
        "photo",
        "photograph",
        "shown",
        "show",
        "shows",
        "depicted",
        "pictured",
        "displayed",
        "visible",
        "seen",
        "tell",
        "know",
        "name",
        "called",
        "does",
        "did",
    }
)
_WORD = re.compile(r"[^\W_]+", re.UNICODE)
_REFUSAL = re.compile(
    r"\b(unknown|not (?:known|found|sure|mentioned|given|provided|available|stated)|no "
    r"(?:information|answer|evidence|data|mention)|cannot|can't|unable|none|n/a|does not|"
    r"doesn't|do not know|don't know)\b",
    re.IGNORECASE,
)


def _fold(word: str) -> str:
    w = word.lower()
    if len(w) > 4 and w.endswith("ies"):
        return w[:-3] + "y"
    if len(w) > 3 and w.endswith("s") and not w.endswith("ss"):
        return w[:-1]
    return w


def content_words(text: str) -> set[str]:
    """Lower-cased, plural-folded words of ``text`` without English stop words."""
    out = set()
    for raw in _WORD.findall(text):
        w = raw.lower()
        if len(w) < 2 or w in ENGLISH_STOP_WORDS or w in _QUESTION_WORDS:
            continue
        out.add(_fold(w))
    return out


def is_refusal(answer: str) -> bool:
    """Whether ``answer`` says the answer is not known ("not found", "unknown", "None", ...)."""
    return bool(_REFUSAL.search(answer))


def is_entity_answer(answer: str, *, max_words: int = 8) -> bool:
    """A short answer that names something (not empty, not a refusal, not a sentence)."""
    text = answer.strip()
    if not text or is_refusal(text):
        return False
    return len(text.split()) <= max_words


def uncovered_words(question: str, hops: Sequence[Hop]) -> set[str]:
    """Content words of ``question`` that no sub-question and no answer so far mention."""
    covered: set[str] = set()
    for hop in hops:
        covered |= content_words(hop.sub_question) | content_words(hop.answer)
    return content_words(question) - covered


def continuation_reason(
    question: str,
    hops: Sequence[Hop],
    *,
    min_uncovered: int = 2,
    max_words: int = 8,
) -> str | None:
    """Why the router should continue instead of stopping now (None: a stop is fine)."""
    if not hops:
        return None
    last = hops[-1]
    if not is_entity_answer(last.answer, max_words=max_words):
        return None
    missing = uncovered_words(question, hops)
    if len(missing) < min_uncovered:
        return None
    words = ", ".join(sorted(missing))
    return (
        f"the answer so far, {last.answer.strip()!r}, is what the question is about, not yet "
        f"its answer (the question also asks about: {words}); ask the next sub-question about "
        f"{last.answer.strip()} and name a knowledge base instead of None"
    )


def anchored_sub_question(question: str, sub_question: str, answer: str) -> str | None:
    """The continuing sub-question to ask instead of ``sub_question`` when it does not mention
    the entity ``answer`` (None: keep it). "Mentions" means sharing a content word of the
    answer that the question itself does not contain."""
    new = content_words(answer) - content_words(question)
    if not new or content_words(sub_question) & new:
        return None
    return f"{question.strip()} ({answer.strip()})"


# a sentence end inside a sub-question: a whole lower-case word of 3+ letters, '.' or '!', then
# a capitalised word ("St. Louis", "Mt. Kenya", "Warner Bros. Pictures" do not match)
_SENTENCE_BREAK = re.compile(r"(?<![^\W\d_])[a-z]{3,}[.!]\s+[A-Z]")


def is_copied_text(sub_question: str) -> bool:
    """Whether ``sub_question`` is several sentences rather than one question: what a small
    router writes when it copies its think text or an instruction into the sub-question
    ("None in the image. I must identify it first, which needs a search with the image ...")."""
    return bool(_SENTENCE_BREAK.search(sub_question))


def asks_whole_question(question: str, sub_question: str) -> bool:
    """Whether ``sub_question`` asks the whole ``question``: it is the question (case, spacing
    and final punctuation ignored), optionally followed by a parenthesised anchor such as
    ``(Canberra)``, so its answer answers the question. A router whose output grammar ends
    sub-questions with ``?`` writes "Q (entity)?" for "Q? (entity)"."""
    q = " ".join(question.split()).casefold().rstrip("?. ")
    sub = " ".join(sub_question.split()).casefold()
    if not q or not sub.startswith(q):
        return False
    rest = sub[len(q) :].strip()
    return rest in ("", "?", ".") or rest.lstrip("?. ").startswith("(")
