"""The bounds of what routing can be worth: ``random-kb`` and ``oracle-kb``.

``random-kb``
    The R1-Router loop whose KB at every retrieving step is drawn uniformly from the configured
    KBs (seeded by the run seed, the question and the step), whatever the LLM named: the
    paper's random-routing ablation. The LLM still writes the sub-questions and decides when
    to stop.
``oracle-kb``
    The gold KB sequence of the dataset (an **upper bound**, never a method to deploy): hop
    ``i`` retrieves from ``gold_kbs[i]``, then the loop stops; the first hop asks the question
    itself, later hops' sub-questions are written by the LLM as in ``learned-router``. It needs
    gold KBs, which the evaluation harness gives it (:meth:`OracleKBPolicy.set_gold`).
``oracle-evidence``
    ``oracle-kb`` that, instead of searching, shows the model exactly the gold evidence of
    each hop (the whole gold document: every indexed block of it, fetched by id): the
    **reading ceiling** of a model, apart from retrieval and routing. It needs gold evidence
    ids too (:meth:`OracleEvidencePolicy.set_gold_evidence`; mkqa-mini ``evidence``, JSONL
    ``gold_evidence``).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import Field

from kbrouter.errors import ConfigError
from kbrouter.policies.base import Runtime
from kbrouter.policies.learned import write_sub_question
from kbrouter.policies.prompts import Hop, PromptBuilder
from kbrouter.policies.r1router import R1RouterConfig, R1RouterPolicy
from kbrouter.types import Evidence, Query, Question, Retrieval, RouteAction, Step

__all__ = ["OracleEvidencePolicy", "OracleKBPolicy", "RandomKBConfig", "RandomKBPolicy"]


class RandomKBConfig(R1RouterConfig):
    """R1-Router settings plus the seed of the random KB draws."""

    seed: int = Field(0, description="Seed of the KB draws (with the question and step).")


class RandomKBPolicy(R1RouterPolicy):
    """R1-Router with a uniformly random KB at every retrieving step (seeded)."""

    name = "random-kb"
    config_cls = RandomKBConfig
    config: RandomKBConfig

    def _draw(self, question: Question, step: Step, names: Sequence[str]) -> str:
        key = f"{self.config.seed}\x1f{question.id or question.text}\x1f{step.index}"
        seed = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
        return random.Random(seed).choice(list(names))

    async def _route(
        self,
        question: Question,
        history: list[Hop],
        rt: Runtime,
        prompts: PromptBuilder,
        step: Step,
        *,
        keep_going: str | None = None,
        exclude: frozenset[str] = frozenset(),
    ) -> RouteAction | None:
        action = await super()._route(
            question, history, rt, prompts, step, keep_going=keep_going, exclude=exclude
        )
        if action is None or action.is_stop:
            return action
        names = [kb.name for kb in rt.kbs]
        kb = self._draw(question, step, [n for n in names if n not in exclude] or names)
        self._note(rt, question, step, f"random KB: {kb} (the LLM named {', '.join(action.kbs)})")
        return action.model_copy(update={"kbs": [kb]})


class OracleKBPolicy(R1RouterPolicy):
    """Routes along the dataset's gold KB sequence (an upper bound on routing)."""

    name = "oracle-kb"
    needs_gold = True

    def __init__(self, config: R1RouterConfig | None = None, **overrides: Any) -> None:
        gold = overrides.pop("gold_kbs", None)
        super().__init__(config, **overrides)
        self._gold: dict[str, list[str]] = {}
        if gold is not None:
            self.set_gold(gold)

    def set_gold(self, gold: Mapping[str, Sequence[str] | None]) -> None:
        """Gold KB names in hop order, by question id (configured KB names)."""
        self._gold = {str(k): list(v) for k, v in gold.items() if v is not None}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "upper_bound": True}

    async def _route(
        self,
        question: Question,
        history: list[Hop],
        rt: Runtime,
        prompts: PromptBuilder,
        step: Step,
        *,
        keep_going: str | None = None,
        exclude: frozenset[str] = frozenset(),
    ) -> RouteAction | None:
        # ``exclude`` does not apply: the gold path decides every hop
        gold = self._gold.get(question.id or "")
        if gold is None:
            raise ConfigError(
                f"oracle-kb has no gold KBs for question {question.id!r}: it runs only in "
                "`kbrouter eval` on a dataset with gold KBs (mkqa-mini, JSONL with gold_kbs)"
            )
        i = len(history)
        if i >= len(gold):
            self._note(rt, question, step, f"route by oracle: stop after {len(gold)} gold hop(s)")
            return RouteAction(think="oracle: the gold hops are covered")
        kb = rt.resolve_kb(gold[i])
        self._note(rt, question, step, f"route by oracle: {kb} (gold hop {i + 1} of {len(gold)})")
        sub_question = await write_sub_question(self, question, history, kb, rt, prompts, step)
        return RouteAction(think=f"oracle: {kb}", sub_question=sub_question, kbs=[kb])


class OracleEvidencePolicy(OracleKBPolicy):
    """Routes along the gold KBs and shows exactly each hop's gold evidence (reading ceiling)."""

    name = "oracle-evidence"
    needs_gold_evidence = True

    def __init__(self, config: R1RouterConfig | None = None, **overrides: Any) -> None:
        evidence = overrides.pop("gold_evidence", None)
        super().__init__(config, **overrides)
        self._evidence: dict[str, list[str]] = {}
        if evidence is not None:
            self.set_gold_evidence(evidence)

    def set_gold_evidence(self, gold: Mapping[str, Sequence[str] | None]) -> None:
        """Gold evidence document ids in hop order, by question id."""
        self._evidence = {str(k): [str(x) for x in v] for k, v in gold.items() if v is not None}

    async def _retrieve(
        self, question: Question, action: RouteAction, rt: Runtime, hop: int
    ) -> list[Retrieval]:
        ids = self._evidence.get(question.id or "")
        if ids is None:
            raise ConfigError(
                f"oracle-evidence has no gold evidence for question {question.id!r}: it runs "
                "only in `kbrouter eval` on a dataset with gold evidence ids (mkqa-mini, JSONL "
                "with gold_evidence)"
            )
        query = Query(text=action.sub_question or question.text)
        if hop >= len(ids):  # more gold KBs than evidence ids: nothing to show
            return [Retrieval(kb=action.kbs[0], query=query, evidence=[], error="no gold id")]
        return [await rt.lookup(action.kbs[0], [ids[hop]], query)]

    def _shown(self, retrieval: Retrieval, rt: Runtime) -> list[Evidence]:
        return list(retrieval.evidence)  # every block of the gold document
