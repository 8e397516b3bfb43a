"""Gold-path trajectories: step samples assembled from a dataset's annotations.

Teacher synthesis (:mod:`kbrouter.train.synth`) keeps only what a teacher model happened to get
right. A dataset that records its gold KBs in hop order and its gold evidence ids (mkqa-mini;
JSONL with ``gold_kbs`` / ``gold_evidence``) says what the right path is, so the router's
training steps can be built from it directly:

1. the sub-question of every hop is written from the question's structure, the way kbrouter's
   loop asks it: the first hop asks the whole question; a hop after an entity was found (the
   image identified, or the bridge passage of a text multi-hop question) asks the question
   anchored on that entity (:func:`~kbrouter.policies.continuation.anchored_sub_question`);
2. every hop is **retrieved with the real KBs** (the engine's ``retrieve_k``, the policy's
   shown top-k and pinned-image rule) and the trajectory is kept only if the retrieval finds
   what the annotation says it should: the gold image matched by content, the gold table among
   the ``retrieve_k`` hits, a gold answer string in the evidence shown at the answering hop,
   the bridge passage at the first hop;
3. the prompts are exactly the engine's (:class:`~kbrouter.policies.prompts.PromptBuilder` with
   the chosen router prompt variant), so a model fine-tuned on them sees at inference what it
   saw in training.

Each kept trajectory gives router steps (the gold KB and sub-question at every hop, then a stop)
and sub-answer steps where the engine asks the model (text and image evidence; image
identification is answered without a model call, and tables are read by the SQL reader, whose
query has no gold). Samples carry ``origin="gold-path"`` so they can be told apart from teacher
samples (``origin="teacher"``) in one file.

The path follows :class:`~kbrouter.policies.r1router.R1RouterPolicy` with its default reading
settings (``identify_first``, ``pinned_alone``, ``relevance_margin``, ``skip_identified_image``,
``carry_identified``, ``answer_from_question_hop``). Its sub-questions are the question, or the
question anchored on an entity, which ``replace_copied_sub_question`` leaves as they are.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kbrouter.policies.continuation import anchored_sub_question
from kbrouter.policies.prompts import Hop, PromptBuilder, RouterPrompt, render_evidence
from kbrouter.policies.r1router import R1RouterConfig
from kbrouter.reading.images import IDENTIFY_QUESTION, asks_what_image_shows, identified_entity
from kbrouter.reading.margin import within_margin
from kbrouter.train.steps import RouteTarget, StepSample
from kbrouter.types import Evidence, Modality, Query, Question, Retrieval

if TYPE_CHECKING:
    from kbrouter.eval.datasets import EvalExample
    from kbrouter.kb.registry import KBRegistry

logger = logging.getLogger(__name__)

GOLD_PATH_ORIGIN = "gold-path"
FIRST_HOP_ORIGIN = "gold-path-first-hop"
"""Origin of the first-hop router samples of questions whose gold path was dropped for a
retrieval miss (``first_hops_of_dropped``): kept apart so their effect can be compared."""

RETRIEVAL_DROPS = frozenset({"gold_not_shown", "table_not_retrieved", "bridge_not_shown"})
"""Drop reasons that are retrieval misses: the question's first gold KB is still the right
route, whatever the KB then returned."""


@dataclass
class GoldPathReport:
    """Outcome of :func:`build_gold_paths`."""

    samples: list[StepSample] = field(default_factory=list)
    total: int = 0
    kept: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    """Why questions gave no trajectory: 'no_gold_kbs', 'image_not_matched', 'gold_not_shown',
    'table_not_retrieved', 'bridge_not_shown', 'unknown_kb', 'image_kb_again', ..."""
    paths: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    """Per kept question id: the (KB, sub-question) of every retrieving hop."""
    first_hops: int = 0
    """Dropped questions that still gave their first router step (``first_hops_of_dropped``)."""

    def counts(self) -> dict[str, int]:
        return dict(Counter(s.kind for s in self.samples))


@dataclass
class _Hop:
    kb: str
    sub_question: str
    answer: str
    asked_text: str
    """What the history records as the hop's question (image identification records
    :data:`IDENTIFY_QUESTION` when the sub-question asked more)."""
    sub_answer_sample: tuple[list[Evidence], str] | None = None
    """(evidence shown, target answer) when the engine asks the model at this hop."""
    identified: bool = False
    """The hop is the image identification (the engine's :attr:`Hop.identified`)."""


class _Drop(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def router_sub_question(text: str, anchor: str | None = None) -> str:
    """``text`` as a sub-question the router's output grammar can produce: one line, no ``?``
    inside, at most 200 characters, ending in ``?``; ``anchor`` is appended in parentheses
    ("Q (entity)?", which :func:`~kbrouter.policies.continuation.asks_whole_question` reads
    as the whole question)."""
    base = " ".join(text.split()).rstrip("?. ").replace("?", ",").replace("<", " ")
    anchor = " ".join((anchor or "").replace("?", " ").replace("<", " ").split())[:80]
    tail = f" ({anchor})?" if anchor else "?"
    room = 200 - len(tail)
    if len(base) > room:
        base = base[:room].rsplit(" ", 1)[0].rstrip(",;:. ")
    return base + tail


def _anchored(question: str, entity: str) -> str:
    """The continuing sub-question after ``entity`` was found (as the engine anchors it)."""
    if anchored_sub_question(question, question, entity) is None:
        return router_sub_question(question)
    return router_sub_question(question, entity)


def _folded(text: str) -> str:
    return " ".join(text.split()).casefold()


def _gold_in(evidence: Sequence[Evidence], golds: Sequence[str]) -> str | None:
    """The first gold answer that the sub-answer prompt shows: a whole-word, case-insensitive
    match in the evidence exactly as rendered into the prompt (passages cut to their shown
    length), so no sample trains the model to answer from what it was not shown."""
    shown = _folded(render_evidence(evidence))
    for g in golds:
        fg = _folded(g)
        if fg and re.search(rf"(?<!\w){re.escape(fg)}(?!\w)", shown):
            return g.strip()
    return None


class _PolicyDefault:
    """Marks an argument left to the R1-Router policy's default."""

    def __repr__(self) -> str:
        return "<the policy's default>"


_POLICY_DEFAULT = _PolicyDefault()


class GoldPathBuilder:
    """Builds gold-path step samples over a KB registry.

    Args:
        registry: the KBs (built); gold KB names must be its KB names or aliases.
        top_k: evidence items a sub-answer prompt shows (the engine's ``top_k``).
        retrieve_k: items requested per search (the engine's ``retrieve_k``).
        router_prompt: the router prompt variant of the samples (``compact`` for training a
            router; the model's GGUF records it on export).
        supports_images: whether the model to train sees image parts (text-only: a note).
        kb_map: gold KB kind -> KB name, when the dataset's kinds are not the KB names.
        first_hops_of_dropped: for a question dropped for a retrieval miss (the gold answer not
            shown, the gold table not retrieved, the bridge not shown), still emit its first
            router step (the whole question to its first gold KB, origin
            :data:`FIRST_HOP_ORIGIN`): which KB to ask first is decided by the annotation, not
            by what the KB returned. On mkqa-mini's training questions these add 42 text and 30
            table first hops (mostly musique and wtq). Nothing after the first hop is emitted
            for them (no sub-answer, no stop).
        relevance_margin: the policy's ``relevance_margin`` (the default: R1-Router's), so a
            sub-answer sample shows what the engine shows; None shows the top-k as retrieved.
        skip_identified_image: the policy's setting (the default: R1-Router's): once the image
            is identified, the engine searches no image KB again, so a question whose answer is
            in the identified item's caption (one image gold KB) has no gold path it can
            follow and is dropped (``image_kb_again``).
        carry_identified: the policy's setting (the default: R1-Router's): a hop after the
            identification that searches another KB also shows the identified item, last.
    """

    def __init__(
        self,
        registry: KBRegistry,
        *,
        top_k: int = 2,
        retrieve_k: int = 10,
        router_prompt: RouterPrompt = "compact",
        supports_images: bool = False,
        kb_map: dict[str, str] | None = None,
        first_hops_of_dropped: bool = False,
        relevance_margin: float | None | _PolicyDefault = _POLICY_DEFAULT,
        skip_identified_image: bool | None = None,
        carry_identified: bool | None = None,
    ) -> None:
        self.registry = registry
        policy = R1RouterConfig()
        if isinstance(relevance_margin, _PolicyDefault):
            relevance_margin = policy.relevance_margin
        self.relevance_margin = relevance_margin
        self.skip_identified_image = (
            policy.skip_identified_image if skip_identified_image is None else skip_identified_image
        )
        self.carry_identified = (
            policy.carry_identified if carry_identified is None else carry_identified
        )
        self.first_hops_of_dropped = first_hops_of_dropped
        self.top_k = top_k
        self.retrieve_k = retrieve_k
        self.kb_map = dict(kb_map or {})
        self.infos = list(registry.infos)
        self.modality = {kb.name: kb.modality for kb in self.infos}
        self.prompts = PromptBuilder(
            self.infos, supports_images=supports_images, router_prompt=router_prompt
        )

    # ------------------------------------------------------------------ public

    def build(
        self,
        examples: Sequence[EvalExample],
        *,
        on_example: Callable[[EvalExample, list[StepSample], str], None] | None = None,
    ) -> GoldPathReport:
        """Gold-path samples of every example that has gold KBs and survives the checks.

        ``on_example(example, samples, reason)`` is called per example (``reason`` the drop
        reason when dropped, with ``samples`` empty or only the first hop; ``reason == "kept"``
        otherwise)."""
        report = GoldPathReport(total=len(examples))
        for ex in examples:
            try:
                hops = self._path(ex)
            except _Drop as d:
                report.dropped[d.reason] += 1
                first: list[StepSample] = []
                if self.first_hops_of_dropped and d.reason in RETRIEVAL_DROPS:
                    first = [self._first_hop(ex)]
                    report.samples.extend(first)
                    report.first_hops += 1
                if on_example is not None:
                    on_example(ex, first, d.reason)
                continue
            samples = self._samples(ex, hops)
            report.kept += 1
            report.samples.extend(samples)
            report.paths[ex.id] = [(h.kb, h.sub_question) for h in hops]
            if on_example is not None:
                on_example(ex, samples, "kept")
        logger.info(
            "gold paths: kept %d/%d questions (%s; first hops of %d dropped), %d step samples %s",
            report.kept,
            report.total,
            dict(report.dropped),
            report.first_hops,
            len(report.samples),
            report.counts(),
        )
        return report

    # ------------------------------------------------------------------ the path

    def _kb(self, kind: str) -> str:
        name = self.kb_map.get(kind, kind)
        try:
            return self.registry.resolve(name)
        except Exception:  # noqa: BLE001 - UnknownKBError: the question cannot be routed here
            raise _Drop("unknown_kb") from None

    def _search(self, kb: str, text: str, image_question: Question) -> Retrieval:
        image = image_question.image if self.modality[kb] == Modality.IMAGE else None
        query = Query(text=text, image=image)
        evidence = self.registry.search(kb, [query], self.retrieve_k)[0]
        return Retrieval(kb=kb, query=query, evidence=evidence)

    def _shown(self, retrieval: Retrieval) -> list[Evidence]:
        """The engine's sub-answer evidence (R1RouterPolicy with pinned_alone and the
        builder's relevance margin)."""
        top = retrieval.evidence[: self.top_k]
        if top and top[0].metadata.get("pinned"):
            return [e for e in top if e.metadata.get("pinned")]
        if self.relevance_margin is not None:
            return within_margin(top, self.relevance_margin)
        return top

    def _answer_hop(
        self, kb: str, sub_q: str, ex: EvalExample, identified: Evidence | None = None
    ) -> _Hop:
        """A hop that must find the final answer in the KB ``kb`` (``identified``: the image
        item identified at an earlier hop, shown last when the builder carries it)."""
        retrieval = self._search(kb, sub_q, ex.question)
        if self.modality[kb] == Modality.TABLE:
            # the gold table among the hits: the route is right even when the KB ranks the
            # table below the shown top-k (a retrieval miss, not a routing one)
            gold_tables = {e for e in ex.gold_evidence or [] if e.startswith("tbl")}
            found = {ev.doc_id for ev in retrieval.evidence}
            if gold_tables and not gold_tables & found:
                raise _Drop("table_not_retrieved")
            # the SQL reader writes the query: no gold target for the model's reply here
            return _Hop(kb, sub_q, ex.golds[0], sub_q)
        shown = self._shown(retrieval)
        if identified is not None and self.carry_identified and self.modality[kb] != Modality.IMAGE:
            shown = [*shown, identified]  # as the engine carries it (carry_identified)
        gold = _gold_in(shown, ex.golds)
        if gold is None:
            raise _Drop("gold_not_shown")
        return _Hop(kb, sub_q, gold, sub_q, sub_answer_sample=(shown, gold))

    def _path(self, ex: EvalExample) -> list[_Hop]:
        if not ex.gold_kbs:
            raise _Drop("no_gold_kbs")
        kbs = [self._kb(k) for k in ex.gold_kbs]
        q = ex.question
        first = kbs[0]
        if self.modality[first] == Modality.IMAGE and q.image is not None:
            return self._image_first(ex, kbs)
        if self.modality[first] == Modality.TEXT and len(kbs) > 1:
            return self._text_multihop(ex, kbs)
        # one hop that asks the whole question (table, image by caption, text)
        return [self._answer_hop(first, router_sub_question(q.text), ex)]

    def _image_first(self, ex: EvalExample, kbs: list[str]) -> list[_Hop]:
        q = ex.question
        sub_q = router_sub_question(q.text)
        retrieval = self._search(kbs[0], sub_q, q)
        entity = identified_entity([retrieval])
        gold_images = [e for e in ex.gold_evidence or [] if e.startswith("img")]
        if entity is None or entity.title is None:
            raise _Drop("image_not_matched")
        if gold_images and entity.doc_id != gold_images[0]:
            raise _Drop("image_not_matched")
        title = entity.title
        if asks_what_image_shows(sub_q):  # as the engine checks the router's sub-question
            # answered by the identification; the whole question was asked
            if len(kbs) == 1:
                if _gold_in([entity], ex.golds) is None:
                    raise _Drop("gold_not_shown")
                return [_Hop(kbs[0], sub_q, title, sub_q, identified=True)]
            hops = [_Hop(kbs[0], sub_q, title, sub_q, identified=True)]
        else:
            hops = [_Hop(kbs[0], sub_q, title, IDENTIFY_QUESTION, identified=True)]
        # the engine goes on from the entity: the next gold KB, or (skip_identified_image off)
        # the image KB again when the answer is in the identified item's caption (one gold hop,
        # two engine steps)
        next_kb = kbs[1] if len(kbs) > 1 else kbs[0]
        if self.skip_identified_image and self.modality[next_kb] == Modality.IMAGE:
            raise _Drop("image_kb_again")  # the engine searches no image KB after identifying
        hops.append(self._answer_hop(next_kb, _anchored(q.text, title), ex, entity))
        return hops

    def _text_multihop(self, ex: EvalExample, kbs: list[str]) -> list[_Hop]:
        """First hop: the whole question; if the annotation has a bridge passage (a gold
        passage whose title the question does not name but another gold passage mentions),
        the second hop asks the question anchored on that title."""
        q = ex.question
        kb = kbs[0]
        docs = [d for d in ex.gold_evidence or [] if d.startswith("text")]
        sub_q = router_sub_question(q.text)
        first = self._search(kb, sub_q, q)
        shown = self._shown(first)
        gold = _gold_in(shown, ex.golds)
        titles = self._titles(docs)
        bridge = self._bridge(q.text, docs, titles)
        if bridge is None or gold is not None:
            # no bridge to follow (comparison questions), or the answer is already shown
            if gold is None:
                raise _Drop("gold_not_shown")
            return [_Hop(kb, sub_q, gold, sub_q, sub_answer_sample=(shown, gold))]
        if not {ev.doc_id for ev in shown} & set(docs):
            raise _Drop("bridge_not_shown")
        # the first hop's answer is the bridge entity; the model's sub-answer there is not
        # trained (the whole question was asked, and the bridge is not its answer)
        # the second hop goes to the second gold KB (text again for most multi-hop questions)
        second = self._answer_hop(kbs[1], _anchored(q.text, bridge), ex)
        return [_Hop(kb, sub_q, bridge, sub_q), second]

    def _titles(self, doc_ids: Sequence[str]) -> dict[str, tuple[str, str]]:
        """doc id -> (title, text) of gold passages, looked up in the KB by id."""
        out: dict[str, tuple[str, str]] = {}
        for name in (kb.name for kb in self.infos if kb.modality == Modality.TEXT):
            fetched = self.registry.get(name).fetch(list(doc_ids))
            for doc, items in zip(doc_ids, fetched, strict=True):
                if items and doc not in out:
                    title = items[0].title or ""
                    out[doc] = (title, " ".join(ev.text or "" for ev in items))
        return out

    @staticmethod
    def _bridge(
        question: str, docs: Sequence[str], titles: dict[str, tuple[str, str]]
    ) -> str | None:
        fq = _folded(question)
        for d in reversed(docs):  # the answer passage is the last hop (musique) or either one
            title, _ = titles.get(d, ("", ""))
            ft = _folded(title)
            if not ft or ft in fq:
                continue
            others = [_folded(titles[o][1]) for o in docs if o != d and o in titles]
            if any(ft in t for t in others):
                return title
        return None

    # ------------------------------------------------------------------ samples

    def _first_hop(self, ex: EvalExample) -> StepSample:
        """The first router step of ``ex``: the whole question to its first gold KB (every
        gold path starts so, see :meth:`_path`)."""
        return StepSample(
            step_type="ret",
            messages=self.prompts.route_messages(ex.question, []),
            target=RouteTarget(
                query=router_sub_question(ex.question.text), retrievers=[self._kb(ex.gold_kbs[0])]
            ),
            source=ex.source,
            trajectory_id=f"{FIRST_HOP_ORIGIN}:{ex.id}",
            step_index=0,
            origin=FIRST_HOP_ORIGIN,
        )

    def _samples(self, ex: EvalExample, hops: list[_Hop]) -> list[StepSample]:
        q = ex.question
        tid = f"{GOLD_PATH_ORIGIN}:{ex.id}"
        out: list[StepSample] = []
        history: list[Hop] = []

        add = out.append
        for hop in hops:
            add(
                StepSample(
                    step_type="ret",
                    messages=self.prompts.route_messages(q, history),
                    target=RouteTarget(query=hop.sub_question, retrievers=[hop.kb]),
                    source=ex.source,
                    trajectory_id=tid,
                    step_index=len(out),
                    origin=GOLD_PATH_ORIGIN,
                )
            )
            if hop.sub_answer_sample is not None:
                shown, answer = hop.sub_answer_sample
                add(
                    StepSample(
                        step_type="ans",
                        messages=self.prompts.sub_answer_messages(q, hop.sub_question, shown),
                        target=answer,
                        source=ex.source,
                        trajectory_id=tid,
                        step_index=len(out),
                        origin=GOLD_PATH_ORIGIN,
                    )
                )
            history.append(Hop(hop.asked_text, hop.answer, (hop.kb,), identified=hop.identified))
        add(
            StepSample(
                step_type="ret",
                messages=self.prompts.route_messages(q, history),
                target=RouteTarget(),
                source=ex.source,
                trajectory_id=tid,
                step_index=len(out),
                origin=GOLD_PATH_ORIGIN,
            )
        )
        return out


def build_gold_paths(
    examples: Sequence[EvalExample], registry: KBRegistry, **kwargs: object
) -> GoldPathReport:
    """:meth:`GoldPathBuilder.build` with a builder made from ``kwargs``."""
    return GoldPathBuilder(registry, **kwargs).build(examples)  # type: ignore[arg-type]


ON_POLICY_GOLD_ORIGIN = "on-policy-gold"
"""Origin of on-policy router samples relabelled by :class:`GoldRouteLabeler`."""


def question_id(trajectory_id: str) -> str:
    """The question id of a step sample's trajectory id: gold paths write
    ``gold-path:<id>`` / ``gold-path-first-hop:<id>``, on-policy rounds ``r<round>:<id>``."""
    prefix, sep, rest = trajectory_id.partition(":")
    return rest if sep else prefix


class GoldRouteLabeler:
    """Labels the router steps of on-policy rollouts from gold paths (a ``LabelFn`` for
    :func:`kbrouter.train.step_grpo.train_step_grpo_on_policy`).

    The policy's own states (its history, its wrong turns) get the gold-path decision for that
    state: the target of a router step is the first gold hop its trajectory has not searched
    yet, with that hop's gold sub-question; once every gold hop is searched, a stop. A trajectory
    that went to a wrong KB first is still asked for the first gold hop next; one that repeats a
    covered KB is asked for the next hop.

    ``gold`` maps a question id to its gold router targets in hop order, a stop last when the
    whole path is known (a question with only its first hop known labels only states before the
    first gold hop was searched). Samples are matched by :func:`question_id`. Router samples of
    unknown questions or past the known path, and sub-answer samples (their target depends on
    what the policy retrieved), are dropped; final samples keep their gold answers. ``counts``
    says how many of each.
    """

    def __init__(self, gold: dict[str, list[RouteTarget]]) -> None:
        self.gold = gold
        self.counts: Counter[str] = Counter()

    @classmethod
    def from_samples(cls, samples: Sequence[StepSample]) -> GoldRouteLabeler:
        """From gold-path samples (:class:`GoldPathBuilder`): each trajectory's router targets
        in step order. A question with a full gold path and a first-hop sample keeps the path."""
        paths: dict[str, list[tuple[int, RouteTarget]]] = {}
        full: set[str] = set()
        for s in samples:
            if s.step_type != "ret" or not isinstance(s.target, RouteTarget):
                continue
            qid = question_id(s.trajectory_id)
            if s.origin == FIRST_HOP_ORIGIN and qid in full:
                continue
            if s.origin != FIRST_HOP_ORIGIN and qid not in full:
                full.add(qid)
                paths.pop(qid, None)  # a first-hop-only entry gives way to the full path
            paths.setdefault(qid, []).append((s.step_index, s.target))
        return cls(
            {qid: [t for _, t in sorted(steps, key=lambda x: x[0])] for qid, steps in paths.items()}
        )

    async def __call__(self, samples: list[StepSample]) -> list[StepSample]:
        out: list[StepSample] = []
        by_traj: dict[str, list[StepSample]] = {}
        for s in samples:
            by_traj.setdefault(s.trajectory_id, []).append(s)
        for tid, steps in by_traj.items():
            gold = self.gold.get(question_id(tid))
            covered = 0
            for s in sorted(steps, key=lambda x: x.step_index):
                if s.final:
                    out.append(s)
                    self.counts["final"] += 1
                    continue
                if s.step_type != "ret":
                    self.counts["sub_answer_dropped"] += 1
                    continue
                if gold is None:
                    self.counts["unknown_question"] += 1
                    continue
                if covered >= len(gold):
                    self.counts["past_known_path"] += 1
                    continue
                target = gold[covered]
                out.append(
                    s.model_copy(
                        update={"target": target, "response": None, "origin": ON_POLICY_GOLD_ORIGIN}
                    )
                )
                self.counts["stop" if target.is_stop else "hop"] += 1
                own = s.target if isinstance(s.target, RouteTarget) else RouteTarget()
                if not target.is_stop and set(target.retrievers) <= set(own.retrievers):
                    covered += 1
        return out
