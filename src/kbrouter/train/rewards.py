"""Step-GRPO rewards (method.md sec. 5): pure scoring functions plus TRL reward callables.

Per step, each reward is in [0, 1] (the optional retrieval-cost term is a penalty):

- **format**: the tags parse (router: ``<sub-question>`` + ``<ret>`` naming known KBs or
  ``None``/``None``; answer: a non-empty ``<answer>``). With ``format_gate`` (the paper) a
  response that does not parse gets 0 for every term; ``format_weight`` optionally adds a
  bonus for parsing.
- **routing** (``ret``): 1 iff exactly one KB is named and it equals the target's KB after
  alias normalisation (or both say stop).
- **similarity** (``ret``): cosine of sentence embeddings of the sub-question and the target
  sub-question, clipped to [0, 1] (both stop: 1; one stop: 0). The encoder is injected; the
  default is the packaged MiniLM (the paper uses BGE-M3).
- **answer** (``ans``): F1-Recall of the ``<answer>`` against the target — binary (1 iff
  recall is 1) when there is a single gold of at most 5 words or several golds, continuous
  recall for a single longer gold (e.g. a teacher's sentence-long sub-answer).
- **retrieval cost** (``ret``): ``-retrieval_cost`` per KB queried (0 in the paper).

The paper's weighting (``RewardConfig.paper()``): ret = 0.5 similarity + 0.5 routing,
ans = answer, gated by format, no format bonus, no cost.

:func:`trl_reward_funcs` turns a :class:`StepRewarder` into TRL reward callables (one per
term, so TRL logs each; the config weights go to ``GRPOConfig.reward_weights``). The dataset
columns ``step_type``, ``final`` and ``target`` (JSON) arrive as keyword arguments.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kbrouter.errors import ConfigError, ModelOutputError, UnknownKBError
from kbrouter.train.steps import RouteTarget, StepSample
from kbrouter.types import kb_key

if TYPE_CHECKING:
    from kbrouter.encoders.base import TextEncoder
    from kbrouter.types import KBInfo, RouteAction

logger = logging.getLogger(__name__)

PAPER_KBS: dict[str, list[str]] = {
    "Text Retriever": ["text", "ter"],
    "Text Image Retriever": ["text-image", "image", "tir"],
    "Table Retriever": ["table", "tar"],
}
"""The paper's KB names (canonical here) with short aliases."""

RewardTerm = Literal["format", "routing", "similarity", "answer", "retrieval_cost"]
REWARD_TERMS: tuple[RewardTerm, ...] = (
    "format",
    "routing",
    "similarity",
    "answer",
    "retrieval_cost",
)


# --------------------------------------------------------------------------- config


class RewardConfig(BaseModel):
    """Weights and switches of the step reward. Defaults = the paper's setting."""

    model_config = ConfigDict(extra="forbid")

    routing_weight: float = Field(0.5, ge=0, description="Weight of the routing term (ret steps).")
    similarity_weight: float = Field(
        0.5, ge=0, description="Weight of the sub-question similarity term (ret steps)."
    )
    answer_weight: float = Field(1.0, ge=0, description="Weight of the answer term (ans steps).")
    format_weight: float = Field(
        0.0, ge=0, description="Bonus for a response whose tags parse (0 in the paper)."
    )
    format_gate: bool = Field(
        True, description="A response whose tags do not parse gets 0 for every term (paper)."
    )
    retrieval_cost: float = Field(
        0.0, ge=0, description="Penalty per KB queried in a ret step (0 in the paper)."
    )
    answer_mode: Literal["auto", "binary", "continuous"] = Field(
        "auto",
        description="auto: binary iff a single gold <= binary_max_words words or several "
        "golds, else continuous recall (paper); or force one mode.",
    )
    binary_max_words: int = Field(5, ge=0, description="Word limit of a 'short' single gold.")
    paper_compat_metric: bool = Field(
        False, description="Use the metric's paper-compatible normalisation quirks."
    )
    encoder: str = Field(
        "minilm", description="Sentence encoder for the similarity term (name or local path)."
    )

    @classmethod
    def paper(cls) -> RewardConfig:
        """The R1-Router setting: ret = 0.5 cos + 0.5 routing, ans = recall, format-gated."""
        return cls()

    def weights(self) -> dict[RewardTerm, float]:
        """Weight of each term, in :data:`REWARD_TERMS` order (the cost term has weight 1;
        its value is already ``-retrieval_cost * n_kbs``)."""
        return {
            "format": self.format_weight,
            "routing": self.routing_weight,
            "similarity": self.similarity_weight,
            "answer": self.answer_weight,
            "retrieval_cost": 1.0,
        }


# --------------------------------------------------------------------------- KB names


class KBNames:
    """Alias-normalised KB names: maps any accepted spelling to the canonical name.

    Build it from the registry (:class:`~kbrouter.kb.base.KBInfo` list) or from a
    ``{canonical: [aliases]}`` mapping; the default is the paper's three KBs. Matching ignores
    case and runs of spaces, ``_`` and ``-``.
    """

    def __init__(self, kbs: Sequence[KBInfo] | Mapping[str, Sequence[str]] | None = None) -> None:
        if kbs is None:
            kbs = PAPER_KBS
        table: dict[str, str] = {}
        if isinstance(kbs, Mapping):
            items = [(str(k), [str(a) for a in v]) for k, v in kbs.items()]
        else:
            items = [(info.name, list(info.aliases)) for info in kbs]
        for canonical, aliases in items:
            for n in [canonical, *aliases]:
                table.setdefault(kb_key(n), canonical)
        self._table = table
        self.names = [c for c, _ in items]

    def resolve(self, name: str) -> str:
        """Canonical name; raises :class:`~kbrouter.errors.UnknownKBError`."""
        try:
            return self._table[kb_key(name)]
        except KeyError:
            raise UnknownKBError(name, self.names) from None

    def check_targets(self, samples: Iterable[StepSample]) -> None:
        """Raise :class:`~kbrouter.errors.ConfigError` when router targets name KBs these names
        do not know: their routing rewards would silently be zero."""
        unknown: dict[str, int] = {}
        for s in samples:
            target = s.target
            if isinstance(target, RouteTarget):
                for k in target.retrievers:
                    if kb_key(k) not in self._table:
                        unknown[k] = unknown.get(k, 0) + 1
        if unknown:
            names = ", ".join(f"{k!r} ({n}x)" for k, n in sorted(unknown.items()))
            raise ConfigError(
                f"training targets name KBs the rewarder does not know: {names}; it knows "
                f"{self.names}. Pass the kbs.toml the data was made for (--kbs), or fix the data"
            )

    def resolve_lenient(self, name: str) -> str:
        """Canonical name, or the normalised spelling for an unknown name (for targets)."""
        try:
            return self.resolve(name)
        except UnknownKBError:
            return kb_key(name)


# --------------------------------------------------------------------------- pure terms


def parse_route_output(
    text: str, kb_names: KBNames, question: str | None = None
) -> RouteAction | None:
    """The parsed router action, or None when the tags do not parse. ``question``: the
    question as asked, for ``terse`` router steps (see
    :func:`kbrouter.policies.prompts.terse_question`)."""
    from kbrouter.policies.parser import parse_route

    try:
        return parse_route(text, kb_names.resolve, question=question)
    except ModelOutputError:
        return None


def parse_answer_output(text: str) -> str | None:
    """The ``<answer>`` content, or None when there is no non-empty ``<answer>`` tag."""
    from kbrouter.policies.parser import parse_answer

    try:
        return parse_answer(text, strict=True)
    except ModelOutputError:
        return None


def format_reward(completion: str, step_type: str, kb_names: KBNames | None = None) -> float:
    """1.0 if the completion's tags parse for this step type, else 0.0."""
    if step_type == "ret":
        return float(parse_route_output(completion, kb_names or KBNames()) is not None)
    return float(parse_answer_output(completion) is not None)


def routing_reward(
    predicted_kbs: Sequence[str], target: RouteTarget, kb_names: KBNames | None = None
) -> float:
    """1.0 iff exactly one KB is predicted and it equals the target's single KB (after alias
    normalisation), or both the prediction and the target are "stop" (no KB)."""
    names = kb_names or KBNames()
    pred = [names.resolve_lenient(k) for k in predicted_kbs]
    gold = [names.resolve_lenient(k) for k in target.retrievers]
    if not gold:
        return float(not pred)
    return float(len(pred) == 1 and len(gold) == 1 and pred[0] == gold[0])


def cosine_similarity_reward(
    predicted: str | None, target: str | None, encoder: TextEncoder
) -> float:
    """Cosine of the embeddings clipped to [0, 1]; both None (stop) -> 1, one None -> 0."""
    return similarity_rewards([(predicted, target)], encoder)[0]


def similarity_rewards(
    pairs: Sequence[tuple[str | None, str | None]], encoder: TextEncoder | None
) -> list[float]:
    """Batched :func:`cosine_similarity_reward` (one encoder call for all pairs)."""
    out: list[float] = [0.0] * len(pairs)
    texts: list[str] = []
    idx: list[int] = []
    for i, (p, t) in enumerate(pairs):
        if p is None or t is None:
            out[i] = float(p is None and t is None)
        else:
            idx.append(i)
            texts.extend([p, t])
    if idx:
        if encoder is None:
            raise ValueError("the similarity reward needs a text encoder")
        vecs = encoder.encode(texts)
        for j, i in enumerate(idx):
            a, b = vecs[2 * j], vecs[2 * j + 1]
            out[i] = float(min(1.0, max(0.0, float((a * b).sum()))))
    return out


def is_binary_answer(golds: Sequence[str], max_words: int = 5) -> bool:
    """The paper's rule: binary iff a single gold of <= ``max_words`` words, or several golds."""
    golds = [g for g in golds if str(g).strip()]
    return len(golds) != 1 or len(str(golds[0]).split()) <= max_words


def answer_reward(
    prediction: str | None,
    golds: str | Sequence[str],
    mode: Literal["auto", "binary", "continuous"] = "auto",
    max_words: int = 5,
    paper_compat: bool = False,
) -> float:
    """F1-Recall of the prediction against the golds, binarised per :func:`is_binary_answer`."""
    from kbrouter.eval.metrics import f1_recall

    gold_list = [golds] if isinstance(golds, str) else list(golds)
    if prediction is None or not gold_list:
        return 0.0
    recall = f1_recall(prediction, gold_list, paper_compat=paper_compat)
    binary = mode == "binary" or (mode == "auto" and is_binary_answer(gold_list, max_words))
    if binary:
        return float(recall >= 1.0 - 1e-9)
    return float(recall)


def retrieval_cost_penalty(predicted_kbs: Sequence[str], cost: float) -> float:
    """``-cost`` per KB queried (a non-positive number)."""
    return -cost * len(predicted_kbs)


# --------------------------------------------------------------------------- combined


@dataclass(frozen=True)
class RewardBreakdown:
    """The terms of one step reward (unweighted) and the weighted total."""

    total: float
    parsed: bool
    format: float = 0.0
    routing: float | None = None
    similarity: float | None = None
    answer: float | None = None
    retrieval_cost: float | None = None

    def term(self, name: RewardTerm) -> float | None:
        return getattr(self, name)


class StepRewarder:
    """Scores completions of step prompts with the configured step reward.

    Args:
        config: weights and switches (default: the paper's).
        kb_names: accepted KB names (default: the paper's three KBs).
        encoder: sentence encoder for the similarity term; loaded lazily from
            ``config.encoder`` (via ``kbrouter.encoders.text.load_text_encoder``) on first use
            when omitted. Not needed when ``similarity_weight`` is 0.
    """

    def __init__(
        self,
        config: RewardConfig | None = None,
        kb_names: KBNames | None = None,
        encoder: TextEncoder | None = None,
    ) -> None:
        self.config = config or RewardConfig.paper()
        self.kb_names = kb_names or KBNames()
        self._encoder = encoder
        self._memo: tuple[Any, list[RewardBreakdown]] | None = None

    @property
    def encoder(self) -> TextEncoder:
        if self._encoder is None:
            from kbrouter.encoders.text import load_text_encoder

            self._encoder = load_text_encoder(self.config.encoder)
        return self._encoder

    def score(
        self, completion: str, step_type: str, target: RouteTarget | str | Sequence[str]
    ) -> RewardBreakdown:
        """Score one completion."""
        return self.score_batch([completion], [step_type], [target])[0]

    def score_sample(self, completion: str, sample: StepSample) -> RewardBreakdown:
        from kbrouter.policies.prompts import terse_question

        return self.score_batch(
            [completion], [sample.step_type], [sample.target], [terse_question(sample.messages)]
        )[0]

    def score_batch(
        self,
        completions: Sequence[str],
        step_types: Sequence[str],
        targets: Sequence[RouteTarget | str | Sequence[str]],
        questions: Sequence[str | None] | None = None,
    ) -> list[RewardBreakdown]:
        """Score many completions (one encoder call for all similarity terms).

        ``questions``: per completion, the question as asked for ``terse`` router steps (whose
        reply may leave out the sub-question), else None."""
        if not (len(completions) == len(step_types) == len(targets)):
            raise ValueError(
                f"lengths differ: {len(completions)} completions, {len(step_types)} step types, "
                f"{len(targets)} targets"
            )
        if questions is not None and len(questions) != len(completions):
            raise ValueError(
                f"lengths differ: {len(completions)} completions, {len(questions)} questions"
            )
        cfg = self.config
        results: list[RewardBreakdown | None] = [None] * len(completions)
        sim_pairs: list[tuple[str | None, str | None]] = []
        sim_rows: list[tuple[int, RouteAction, RouteTarget]] = []
        for i, (text, stype, target) in enumerate(
            zip(completions, step_types, targets, strict=True)
        ):
            if stype == "ret":
                if not isinstance(target, RouteTarget):
                    raise ValueError(f"a 'ret' step needs a RouteTarget, got {target!r}")
                action = parse_route_output(
                    text, self.kb_names, questions[i] if questions is not None else None
                )
                if action is None:
                    results[i] = self._unparsed("ret")
                    continue
                sim_rows.append((i, action, target))
                sim_pairs.append((action.sub_question, target.query))
            elif stype == "ans":
                if isinstance(target, RouteTarget):
                    raise ValueError("an 'ans' step needs a str or list target, got a RouteTarget")
                pred = parse_answer_output(text)
                if pred is None and cfg.format_gate:
                    results[i] = self._unparsed("ans")
                    continue
                if pred is None:
                    from kbrouter.policies.parser import parse_answer

                    pred = parse_answer(text)
                ans = answer_reward(
                    pred, target, cfg.answer_mode, cfg.binary_max_words, cfg.paper_compat_metric
                )
                fmt = float(parse_answer_output(text) is not None)
                total = cfg.format_weight * fmt + cfg.answer_weight * ans
                results[i] = RewardBreakdown(total=total, parsed=bool(fmt), format=fmt, answer=ans)
            else:
                raise ValueError(f"unknown step type {stype!r} (expected 'ret' or 'ans')")
        if sim_rows:
            need_sim = cfg.similarity_weight > 0
            sims = (
                similarity_rewards(sim_pairs, self.encoder) if need_sim else [0.0] * len(sim_pairs)
            )
            for (i, action, target), sim in zip(sim_rows, sims, strict=True):
                route = routing_reward(action.kbs, target, self.kb_names)
                cost = retrieval_cost_penalty(action.kbs, cfg.retrieval_cost)
                total = (
                    cfg.format_weight
                    + cfg.routing_weight * route
                    + cfg.similarity_weight * sim
                    + cost
                )
                results[i] = RewardBreakdown(
                    total=total,
                    parsed=True,
                    format=1.0,
                    routing=route,
                    similarity=sim if need_sim else None,
                    retrieval_cost=cost,
                )
        return [r for r in results if r is not None]

    def _unparsed(self, step_type: str) -> RewardBreakdown:
        if step_type == "ret":
            return RewardBreakdown(
                total=0.0, parsed=False, routing=0.0, similarity=0.0, retrieval_cost=0.0
            )
        return RewardBreakdown(total=0.0, parsed=False, answer=0.0)

    # ----------------------------------------------------------------- TRL glue

    def score_trl(
        self,
        completions: Sequence[Any],
        step_type: Sequence[str],
        target: Sequence[str],
        prompts: Sequence[Any] | None = None,
        **_: Any,
    ) -> list[RewardBreakdown]:
        """Score a TRL batch (memoised, so every per-term callable reuses one computation).
        ``prompts`` (TRL's prompt column) tell which router steps use the ``terse`` format."""
        from kbrouter.policies.prompts import terse_question

        questions = tuple(terse_question(p) for p in prompts) if prompts is not None else None
        key = (
            tuple(completion_text(c) for c in completions),
            tuple(step_type),
            tuple(target),
            questions,
        )
        if self._memo is not None and self._memo[0] == key:
            return self._memo[1]
        targets = [decode_target(s, t) for s, t in zip(step_type, target, strict=True)]
        out = self.score_batch(list(key[0]), list(step_type), targets, questions)
        self._memo = (key, out)
        return out


def completion_text(completion: Any) -> str:
    """The text of a TRL completion (plain string or a conversational message list)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Mapping):
        return str(completion.get("content", ""))
    if isinstance(completion, Sequence):
        return "".join(completion_text(m) for m in completion)
    return str(completion)


def encode_target(target: RouteTarget | str | Sequence[str]) -> str:
    """JSON for the ``target`` dataset column (columns must have one type)."""
    if isinstance(target, RouteTarget):
        return json.dumps(target.model_dump())
    if isinstance(target, str):
        return json.dumps(target)
    return json.dumps(list(target))


def decode_target(step_type: str, raw: str) -> RouteTarget | str | list[str]:
    """Inverse of :func:`encode_target`."""
    value = json.loads(raw) if isinstance(raw, str) else raw
    if step_type == "ret":
        return RouteTarget.model_validate(value)
    if isinstance(value, list):
        return [str(v) for v in value]
    return str(value)


def trl_reward_funcs(
    rewarder: StepRewarder, terms: Sequence[RewardTerm] | None = None
) -> tuple[list[Callable[..., list[float | None]]], list[float]]:
    """TRL reward callables (one per term) and their weights for ``GRPOConfig.reward_weights``.

    Terms with weight 0 are left out (except ``format`` when it is the only signal). A term
    returns ``None`` for samples it does not apply to (e.g. routing on ``ans`` steps), which
    TRL skips; TRL sums the weighted terms, which equals :attr:`RewardBreakdown.total`.
    """
    weights = rewarder.config.weights()
    if terms is None:
        terms = [
            t
            for t in REWARD_TERMS
            if weights[t] > 0
            and not (t == "retrieval_cost" and rewarder.config.retrieval_cost == 0)
        ]
    funcs = []
    for term in terms:
        funcs.append(_make_term_func(rewarder, term))
    return funcs, [weights[t] for t in terms]


def _make_term_func(rewarder: StepRewarder, term: RewardTerm) -> Callable[..., list[float | None]]:
    def reward(
        prompts: Sequence[Any],
        completions: Sequence[Any],
        step_type: Sequence[str],
        target: Sequence[str],
        **kwargs: Any,
    ) -> list[float | None]:
        scores = rewarder.score_trl(completions, step_type, target, prompts)
        if term == "format":
            return [s.format for s in scores]
        return [s.term(term) for s in scores]

    reward.__name__ = f"{term}_reward"
    reward.__qualname__ = reward.__name__
    return reward
