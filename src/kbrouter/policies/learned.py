"""Routing by the learned router (:mod:`kbrouter.routing`): ``learned-router`` and ``hybrid``.

Both run the R1-Router loop (retrieve, answer the sub-question, final answer from the whole
history; same prompts, same budget) and differ only in who decides each step:

``learned-router``
    The learned router decides retrieve-or-stop and the KB at every step, without an LLM call.
    The first hop asks the question itself; a later hop's sub-question is written by the LLM
    with the router prompt, its ``<ret>`` constrained to the chosen KB (a grammar where the
    backend enforces one; otherwise the chosen KB is used whatever the reply names).
``hybrid``
    The LLM routes as in R1-Router (think, sub-question, KB); the learned router, given the
    LLM's sub-question too, overrides the KB when it is confident (at or above the confidence
    threshold fitted on held-out data) and vetoes a stop before any retrieval when it is
    confident that retrieval is needed; otherwise the LLM's choice stands.

Every decision is written to the step's notes, saying who decided and with what probability.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from kbrouter.errors import ConfigError, ModelOutputError, RouterError
from kbrouter.policies.base import Runtime
from kbrouter.policies.prompts import Hop, PromptBuilder
from kbrouter.policies.r1router import R1RouterConfig, R1RouterPolicy
from kbrouter.routing.router import LearnedRouter
from kbrouter.types import (
    NONE_LABEL,
    Question,
    RouteAction,
    RouteDistribution,
    RouteState,
    SamplingParams,
    Step,
)

__all__ = ["HybridPolicy", "LearnedRouterConfig", "LearnedRouterPolicy", "write_sub_question"]


class LearnedRouterConfig(R1RouterConfig):
    """Settings of the learned-router and hybrid loops (plus R1-Router's)."""

    router: str | None = Field(None, description="Folder of a saved learned router.")
    min_retrieval_steps: int = Field(
        0,
        ge=0,
        description="Steps that must retrieve before the loop may stop. 0 by default: the "
        "learned router's fitted abstain decision (and hybrid's veto) decide a stop at once.",
    )


def _fmt(dist: RouteDistribution) -> str:
    top = sorted(dist.probs.items(), key=lambda kv: -kv[1])[:3]
    return ", ".join(f"{k} {p:.2f}" for k, p in top)


def _prev_kbs(history: list[Hop]) -> list[str]:
    return [h.kbs[0] for h in history if h.kbs]


async def write_sub_question(
    policy: R1RouterPolicy,
    question: Question,
    history: list[Hop],
    kb: str,
    rt: Runtime,
    prompts: PromptBuilder,
    step: Step,
) -> str:
    """The next sub-question for ``kb``: the question itself on the first hop, else written by
    the LLM with the router prompt (``<ret>`` constrained to ``kb``); falls back to the question
    plus the last answer when the reply is unusable (noted)."""
    if not history:
        return question.text
    messages = prompts.route_messages(question, history)
    if policy.config.use_grammar and getattr(rt, "supports_grammar", False):
        params = SamplingParams(
            max_tokens=policy.config.route_max_tokens,
            grammar=prompts.route_grammar(allow_stop=False, kb_names=[kb]),
        )
    else:
        params = SamplingParams(max_tokens=policy.config.route_max_tokens)
    call = await rt.chat("route", messages, params)
    step.route_calls.append(call)
    problem = call.error
    if not problem:
        try:
            action = prompts.parse_route(call.output, rt.resolve_kb, question)
            if action.sub_question:
                return action.sub_question
            problem = "the reply has no sub-question"
        except ModelOutputError as e:
            problem = str(e)
    fallback = f"{question.text} ({history[-1].answer})" if history[-1].answer else question.text
    policy._note(
        rt, question, step, f"sub-question reply unusable ({problem}); asking {fallback!r}"
    )
    return fallback


class _RouterMixin:
    """Holds a :class:`LearnedRouter` and checks it against the runtime's KBs once."""

    _router: LearnedRouter
    _checked: tuple[str, ...] | None = None

    def _init_router(self, router: LearnedRouter | str | None, path: str | None) -> None:
        if isinstance(router, LearnedRouter):
            self._router = router
            return
        where = router if isinstance(router, str) else path
        if not where:
            raise ConfigError(
                f"method {self.name!r} needs a trained router: router=DIR (--router DIR); "  # type: ignore[attr-defined]
                "train one with `kbrouter train router`"
            )
        self._router = LearnedRouter.load(where)

    @property
    def router(self) -> LearnedRouter:
        return self._router

    def _check_kbs(self, rt: Runtime) -> None:
        names = tuple(kb.name for kb in rt.kbs)
        if self._checked == names:
            return
        if set(names) != set(self._router.kb_names):
            raise RouterError(
                f"the learned router was trained for KBs {self._router.kb_names}, but this run "
                f"has {list(names)}; retrain it on these KBs"
            )
        self._checked = names

    def _state(
        self, question: Question, history: list[Hop], step: Step, sub_question: str | None = None
    ) -> RouteState:
        return RouteState(
            question=question.text,
            has_image=question.image is not None,
            step=step.index,
            prev_kbs=_prev_kbs(history),
            sub_question=sub_question,
        )


class _RoutedPolicy(_RouterMixin, R1RouterPolicy):
    """The R1-Router loop with a learned router at hand (``router=`` a folder or a router)."""

    config_cls = LearnedRouterConfig
    config: LearnedRouterConfig

    def __init__(self, config: LearnedRouterConfig | None = None, **overrides: Any) -> None:
        router = overrides.pop("router", None)
        if isinstance(router, str):
            overrides["router"] = router
        super().__init__(config, **overrides)
        self._init_router(router, self.config.router)

    def describe(self) -> dict[str, Any]:
        m = self._router.manifest
        return {
            **super().describe(),
            "router_thresholds": m.get("thresholds"),
            "router_data_sha256": m.get("data", {}).get("sha256"),
        }


class LearnedRouterPolicy(_RoutedPolicy):
    """The learned router decides every step; the LLM writes later sub-questions and answers."""

    name = "learned-router"

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
        self._check_kbs(rt)
        dist = self._router.route(self._state(question, history, step))
        label = dist.label
        if label == NONE_LABEL and step.index < self.config.min_retrieval_steps:
            label = dist.best_kb or label
            self._note(
                rt,
                question,
                step,
                f"learned router said none before the minimum "
                f"{self.config.min_retrieval_steps} retrieval step(s); using {label}",
            )
        elif label == NONE_LABEL and keep_going is not None and dist.best_kb:
            label = dist.best_kb
            step.continued = True
            self._note(rt, question, step, f"multi-hop continuation: {keep_going}; using {label}")
        if label in exclude:
            others = {k: p for k, p in dist.probs.items() if k != NONE_LABEL and k not in exclude}
            if others:
                best = max(others, key=lambda k: others[k])
                self._note(
                    rt,
                    question,
                    step,
                    f"the question's image is identified: {label} left out at this step; "
                    f"using {best}",
                )
                label = best
        if label == NONE_LABEL:
            self._note(rt, question, step, f"route by learned router: stop ({_fmt(dist)})")
            return RouteAction(think=f"learned router: stop ({_fmt(dist)})")
        kb = rt.resolve_kb(label)
        self._note(rt, question, step, f"route by learned router: {kb} ({_fmt(dist)})")
        sub_question = await write_sub_question(self, question, history, kb, rt, prompts, step)
        return RouteAction(
            think=f"learned router: {kb} ({_fmt(dist)})", sub_question=sub_question, kbs=[kb]
        )


class HybridPolicy(_RoutedPolicy):
    """The LLM routes; the learned router overrides its KB (or vetoes an early stop) when sure."""

    name = "hybrid"

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
        self._check_kbs(rt)
        action = await super()._route(
            question, history, rt, prompts, step, keep_going=keep_going, exclude=exclude
        )
        sure = self._router.is_confident
        if action is None:  # the LLM's reply was unusable (or failed): the router may rescue it
            dist = self._router.route(self._state(question, history, step))
            if history or dist.label == NONE_LABEL or not sure(dist):
                return None
            kb = rt.resolve_kb(dist.label)
            self._note(
                rt,
                question,
                step,
                f"route by learned router after an unusable LLM reply: {kb} ({_fmt(dist)})",
            )
            return RouteAction(sub_question=question.text, kbs=[kb])
        dist = self._router.route(self._state(question, history, step, action.sub_question))
        if action.is_stop:
            if not history and dist.label != NONE_LABEL and sure(dist):
                kb = rt.resolve_kb(dist.label)
                self._note(
                    rt,
                    question,
                    step,
                    f"learned router vetoed the LLM's stop before any "
                    f"retrieval: {kb} ({_fmt(dist)})",
                )
                return RouteAction(think=action.think, sub_question=question.text, kbs=[kb])
            self._note(rt, question, step, f"route by LLM: stop (learned router: {_fmt(dist)})")
            return action
        overrides = dist.label != NONE_LABEL and dist.label not in exclude and sure(dist)
        if overrides and action.kbs != [dist.label]:
            kb = rt.resolve_kb(dist.label)
            self._note(
                rt,
                question,
                step,
                f"learned router overrode the LLM's {', '.join(action.kbs)} -> {kb} ({_fmt(dist)})",
            )
            return action.model_copy(update={"kbs": [kb]})
        self._note(
            rt,
            question,
            step,
            f"route by LLM: {', '.join(action.kbs)} (learned router: {_fmt(dist)})",
        )
        return action
