"""The engine: concurrency, ordering, failure isolation, retrieval batching, replay cache."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from kbrouter.engine.engine import Engine, EngineConfig
from kbrouter.engine.runtime import merge_params
from kbrouter.kb.base import KnowledgeBase
from kbrouter.policies.base import Policy, Runtime
from kbrouter.policies.r1router import PAPER_READING, R1RouterPolicy
from kbrouter.testing import ScriptedChatModel, StaticKB, StaticKBRegistry
from kbrouter.types import (
    ChatMessage,
    Evidence,
    Query,
    Question,
    SamplingParams,
    Step,
    Trajectory,
)

QUESTIONS = [
    "What is the capital of Australia?",
    "What is the capital of Brazil?",
    "What is the capital of Kenya?",
    "What is the capital of Canada?",
    "What is the capital of Egypt?",
    "What is the capital of Greece?",
    "What is the capital of India?",
    "What is the capital of Sweden?",
]


def r1_reply(messages: list[ChatMessage]) -> str:
    """A deterministic fake model for the R1-Router prompts: one text hop, then stop.

    The answer echoes the question so ordering mistakes are visible.
    """
    system, last = messages[0].text(), messages[-1].text()
    question = last.split("Question: ", 1)[-1].split("\n", 1)[0]
    if "<ret>" in system:
        if "Answer 1:" in last:
            return "<think>done</think><sub-question>None</sub-question><ret>None</ret>"
        return f"<think>t</think><sub-question>{question}</sub-question><ret>text</ret>"
    if "final answer" in system:
        return f"<answer>final for {question}</answer>"
    return "<answer>sub</answer>"


class CountingKBs:
    """Wraps a registry; counts kb.search calls and their batch sizes per KB."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.calls: dict[str, list[int]] = {}
        self._wrapped: dict[str, KnowledgeBase] = {}

    @property
    def infos(self):
        return self.inner.infos

    def resolve(self, name: str) -> str:
        return self.inner.resolve(name)

    def get(self, name: str) -> KnowledgeBase:
        canon = self.resolve(name)
        if canon not in self._wrapped:
            kb = self.inner.get(canon)
            outer = self

            class _Counting(KnowledgeBase):
                info = kb.info

                def search(self, queries: Sequence[Query], k: int | None = None):
                    outer.calls.setdefault(canon, []).append(len(queries))
                    return kb.search(queries, k)

            self._wrapped[canon] = _Counting()
        return self._wrapped[canon]


def make_engine(kbs, model, purpose_models=None, **cfg) -> Engine:
    return Engine(
        model,
        kbs,
        R1RouterPolicy(**PAPER_READING),
        EngineConfig(**cfg),
        purpose_models=purpose_models,
    )


def test_answer_many_keeps_input_order_under_concurrency(demo_kbs):
    """Results come back in input order while questions run concurrently (bounded)."""
    model = ScriptedChatModel(r1_reply, latency=0.01)
    engine = make_engine(demo_kbs, model, concurrency=3)
    done: list[int] = []
    trajs = engine.answer_many_sync(QUESTIONS, on_result=lambda i, t: done.append(i))
    assert [t.question.text for t in trajs] == QUESTIONS
    assert [t.answer for t in trajs] == [f"final for {q}" for q in QUESTIONS]
    assert sorted(done) == list(range(len(QUESTIONS)))
    assert 1 < model.max_in_flight <= 3
    assert all(t.error is None and t.stop_reason == "answered" for t in trajs)


def test_concurrent_retrievals_are_batched(demo_kbs):
    """Eight concurrent questions' retrievals are merged into fewer kb.search calls."""
    kbs = CountingKBs(demo_kbs)
    engine = make_engine(kbs, ScriptedChatModel(r1_reply), concurrency=8, batch_window_ms=50)
    trajs = engine.answer_many_sync(QUESTIONS)
    assert all(len(t.retrievals()) == 1 and t.retrievals()[0].evidence for t in trajs)
    sizes = kbs.calls["text"]
    assert sum(sizes) == len(QUESTIONS)
    assert len(sizes) < len(QUESTIONS)
    assert max(sizes) > 1
    # Batched results go back to the right question.
    for t in trajs:
        r = t.retrievals()[0]
        assert r.query.text == t.question.text
    assert trajs[0].retrievals()[0].evidence[0].id == "australia"


def test_single_question_does_not_wait_for_a_batch(demo_kbs):
    """With one question in flight the batcher sends at once (batch of 1)."""
    kbs = CountingKBs(demo_kbs)
    engine = make_engine(kbs, ScriptedChatModel(r1_reply), batch_window_ms=10_000)
    traj = engine.answer_sync(QUESTIONS[0])
    assert kbs.calls["text"] == [1]
    assert traj.retrievals()[0].seconds < 5


class ExplodingPolicy(Policy):
    """Raises on questions containing 'boom'; otherwise answers directly."""

    name = "exploding"

    async def run(self, question: Question, rt: Runtime) -> Trajectory:
        if "boom" in question.text:
            raise RuntimeError(f"policy bug on {question.text!r}")
        call = await rt.chat("final", [ChatMessage(role="user", content=question.text)])
        return Trajectory(question=question, method=self.name, final_call=call, answer=call.output)


def test_one_failing_question_never_kills_the_batch(demo_kbs):
    """A policy exception becomes that question's trajectory error; the others finish."""
    model = ScriptedChatModel(lambda m: "ok")
    engine = Engine(model, demo_kbs, ExplodingPolicy())
    trajs = engine.answer_many_sync(["a", "boom now", "c"], concurrency=2)
    assert [t.answer for t in trajs] == ["ok", "", "ok"]
    assert trajs[1].stop_reason == "error"
    assert "RuntimeError: policy bug on 'boom now'" in trajs[1].error
    assert trajs[0].error is None and trajs[2].error is None


def test_backend_and_search_errors_become_records():
    """Model and KB exceptions are captured in ModelCall.error / Retrieval.error."""
    kbs = StaticKBRegistry([StaticKB("text", fail=True)])
    model = ScriptedChatModel(r1_reply, fail_at=[1])
    traj = make_engine(kbs, model).answer_sync("What is the capital of Peru?")
    ret = traj.retrievals()[0]
    assert ret.evidence == [] and "search failed in KB 'text'" in ret.error
    assert "retrieval from 'text' failed" in traj.steps[0].notes[0]
    assert "ModelError: scripted failure at call 1" in traj.steps[0].answer_call.error
    assert traj.error is None and traj.answer.startswith("final for")


def test_unknown_kb_in_runtime_retrieve_is_an_error_record(demo_kbs):
    """Runtime.retrieve with an unknown KB returns an error record, not an exception."""

    class Probe(Policy):
        name = "probe"

        async def run(self, question: Question, rt: Runtime) -> Trajectory:
            r = await rt.retrieve("nowhere", Query(text=question.text))
            return Trajectory(
                question=question, method=self.name, steps=[Step(index=0, retrievals=[r])]
            )

    traj = Engine(ScriptedChatModel([]), demo_kbs, Probe()).answer_sync("x")
    assert "unknown knowledge base 'nowhere'" in traj.retrievals()[0].error


def _strip_volatile(t: Trajectory) -> dict:
    data = t.model_dump(mode="json")
    data.pop("seconds")

    def walk(o):
        if isinstance(o, dict):
            return {k: walk(v) for k, v in o.items() if k not in ("cached", "seconds")}
        if isinstance(o, list):
            return [walk(v) for v in o]
        return o

    return walk(data)


def test_replay_cache_gives_identical_trajectories_without_the_model(demo_kbs, tmp_path):
    """A second run with the same cache replays every call: same trajectories, no model call."""
    cache = tmp_path / "cache"
    first_model = ScriptedChatModel(r1_reply)
    first = make_engine(demo_kbs, first_model, cache_dir=cache).answer_many_sync(QUESTIONS[:4])
    assert first_model.calls == 4 * 4
    assert not any(c.cached for t in first for c in t.model_calls())

    dead = ScriptedChatModel([])  # any real call would fail
    engine = make_engine(demo_kbs, dead, cache_dir=cache)
    again = engine.answer_many_sync(QUESTIONS[:4])
    assert dead.calls == 0
    assert all(c.cached for t in again for c in t.model_calls())
    assert all(r.cached for t in again for r in t.retrievals())
    assert [_strip_volatile(t) for t in again] == [_strip_volatile(t) for t in first]
    # Timings are replayed too.
    assert again[0].model_calls()[0].seconds == first[0].model_calls()[0].seconds
    # JSON round-trip of a replayed trajectory.
    assert Trajectory.model_validate_json(again[0].model_dump_json()) == again[0]
    engine.close()


def test_cache_key_depends_on_inputs(demo_kbs, tmp_path):
    """Another seed (different sampling params) misses the cache; failed calls are not stored."""
    cache = tmp_path / "cache"
    make_engine(demo_kbs, ScriptedChatModel(r1_reply), cache_dir=cache).answer_sync("q1?")
    other_seed = ScriptedChatModel(r1_reply)
    make_engine(demo_kbs, other_seed, cache_dir=cache, seed=1).answer_sync("q1?")
    assert other_seed.calls == 4

    failing = ScriptedChatModel(r1_reply, fail_at=[0])
    make_engine(demo_kbs, failing, cache_dir=cache).answer_sync("q2?")
    retry = ScriptedChatModel(r1_reply)
    make_engine(demo_kbs, retry, cache_dir=cache).answer_sync("q2?")
    assert retry.calls >= 1  # the failed router call was not cached


def test_sampling_defaults_and_policy_overrides():
    """Only explicitly set fields of a policy's params override the engine defaults."""
    defaults = SamplingParams(temperature=0.7, seed=5, max_tokens=100)
    merged = merge_params(defaults, SamplingParams(max_tokens=32))
    assert (merged.temperature, merged.seed, merged.max_tokens) == (0.7, 5, 32)
    assert merge_params(defaults, None) == defaults
    cfg = EngineConfig(seed=3)
    assert cfg.effective_sampling().seed == 3 and cfg.effective_sampling().temperature == 0.0


def test_engine_seed_reaches_the_model(demo_kbs):
    """The engine seed and greedy default are what the backend receives."""
    model = ScriptedChatModel(r1_reply)
    make_engine(demo_kbs, model, seed=42).answer_sync("q?")
    assert {p.seed for _, p in model.requests} == {42}
    assert {p.temperature for _, p in model.requests} == {0.0}


def test_trajectory_records_config(demo_kbs):
    """Each trajectory records the policy, model and engine settings."""
    traj = make_engine(demo_kbs, ScriptedChatModel(r1_reply), max_steps=2).answer_sync("q?")
    assert traj.config["policy"] == "r1router"
    assert traj.config["model"]["name"] == "scripted"
    assert traj.config["engine"]["max_steps"] == 2
    assert traj.method == "r1router" and traj.seconds > 0


def test_answer_many_inside_running_loop(demo_kbs):
    """The async API works inside an existing event loop (e.g. a server)."""

    async def main():
        engine = make_engine(demo_kbs, ScriptedChatModel(r1_reply))
        return await engine.answer_many([Question(text="q1?", id="a"), "q2?"], concurrency=2)

    trajs = asyncio.run(main())
    assert [t.question.id for t in trajs] == ["a", None]


def test_bad_question_type_is_rejected(demo_kbs):
    """Only Question objects or strings are accepted."""
    with pytest.raises(TypeError, match="expected a Question or a string"):
        make_engine(demo_kbs, ScriptedChatModel([])).answer_sync(42)  # type: ignore[arg-type]


def test_static_kb_evidence_round_trip():
    """StaticKB (test double) ranks by word overlap and returns copies with scores."""
    kb = StaticKB("t", [Evidence(kb="t", id="1", score=0, text="alpha beta")])
    assert kb.search([Query(text="beta?"), Query(text="gamma")]) == [
        [Evidence(kb="t", id="1", score=1.0, text="alpha beta")],
        [],
    ]


class ImageProbe(Policy):
    """Searches the image KB once with the question's own image, then stops."""

    name = "image-probe"

    async def run(self, question: Question, rt: Runtime) -> Trajectory:
        r = await rt.retrieve("image", Query(text=question.text, image=question.image))
        return Trajectory(
            question=question, method=self.name, steps=[Step(index=0, retrievals=[r])]
        )


def test_one_bad_query_image_fails_only_its_own_question(tmp_path):
    """A batched image search with one undecodable query image: only that question's
    retrieval fails; the others in the same batch get their evidence."""
    from kb_helpers import fake_loaders, tiny_config

    from kbrouter.kb.registry import KBRegistry

    reg = KBRegistry(tiny_config(tmp_path), **fake_loaders())
    reg.build(["image"], progress=False)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    good = tmp_path / "data" / "img" / "blue.png"
    kbs = CountingKBs(reg)
    engine = Engine(
        ScriptedChatModel([]), kbs, ImageProbe(), EngineConfig(concurrency=4, batch_window_ms=200)
    )
    questions = [Question(text=f"Which flag is shown? ({i})", image=good) for i in range(4)]
    questions[2] = Question(text="Which flag is shown? (bad)", image=bad)
    trajs = engine.answer_many_sync(questions)
    assert max(kbs.calls["image"]) > 1  # the four queries were batched
    for i, t in enumerate(trajs):
        r = t.retrievals()[0]
        if i == 2:
            assert r.evidence == [] and "bad.png" in r.error
        else:
            assert r.error is None and r.evidence[0].id == "img-blue"
    reg.close()


def test_a_failing_kb_is_not_retried_query_by_query_forever():
    """When single-query retries of a failed batch fail the same way twice, the KB itself is
    failing: the remaining questions get its error at once (no retry storm)."""
    kbs = CountingKBs(StaticKBRegistry([StaticKB("text", fail=True)]))
    engine = make_engine(kbs, ScriptedChatModel(r1_reply), concurrency=8, batch_window_ms=200)
    trajs = engine.answer_many_sync(QUESTIONS)
    assert all("search failed in KB 'text'" in (t.retrievals()[0].error or "") for t in trajs)
    sizes = kbs.calls["text"]
    assert sizes[0] > 2 and sizes[1:3] == [1, 1]
    assert len(sizes) < 1 + sizes[0]  # not one retry per question of the batch


def test_a_model_per_call_purpose_answers_only_its_calls(demo_kbs, tmp_path):
    """``purpose_models`` sends the calls of one purpose to another backend: here the final
    answer. Each backend gets only its own calls, a grammar goes only to a backend that enforces
    it, the trajectory records both models, and the replay cache keys each call by the model
    that made it."""
    router = ScriptedChatModel(r1_reply, supports_grammar=True, name="router")
    reader = ScriptedChatModel(r1_reply, supports_grammar=False, name="reader")
    engine = make_engine(demo_kbs, router, {"final": reader}, cache_dir=tmp_path / "cache")
    traj = engine.answer_sync(QUESTIONS[0])
    assert traj.answer == f"final for {QUESTIONS[0]}"
    assert [kind for kind, _ in _kinds(router)] == ["route", "sub", "route"]
    assert [kind for kind, _ in _kinds(reader)] == ["final"]
    assert all(p.grammar is None for _, p in reader.requests)  # it does not enforce grammars
    assert router.requests[0][1].grammar is not None
    assert traj.config["model"]["name"] == "router"
    assert traj.config["purpose_models"]["final"]["name"] == "reader"
    engine.close()

    # the replay cache keys each call by the model that made it: with the same router and
    # another final-answer model, only the final call is made again
    router_again = ScriptedChatModel(r1_reply, supports_grammar=True, name="router")
    other_reader = ScriptedChatModel(r1_reply, name="another reader")
    again = make_engine(
        demo_kbs, router_again, {"final": other_reader}, cache_dir=tmp_path / "cache"
    )
    again.answer_sync(QUESTIONS[0])
    assert (router_again.calls, other_reader.calls) == (0, 1)
    again.close()


def test_a_model_for_an_unknown_purpose_is_a_config_error(demo_kbs):
    from kbrouter.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown call purpose 'reading'.*read"):
        Engine(
            ScriptedChatModel(r1_reply),
            demo_kbs,
            R1RouterPolicy(),
            purpose_models={"reading": ScriptedChatModel(r1_reply)},
        )


def _kinds(model: ScriptedChatModel) -> list[tuple[str, SamplingParams]]:
    out = []
    for messages, params in model.requests:
        system = messages[0].text()
        kind = "route" if "<ret>" in system else "final" if "final answer" in system else "sub"
        out.append((kind, params))
    return out
