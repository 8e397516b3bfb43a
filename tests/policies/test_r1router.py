"""The R1-Router loop on real (BM25) demo KBs with a scripted model."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

from kbrouter.engine.engine import Engine, EngineConfig
from kbrouter.engine.events import TraceEvent
from kbrouter.policies.prompts import answer_grammar, route_grammar
from kbrouter.policies.r1router import PAPER_READING, R1RouterPolicy
from kbrouter.testing import ScriptedChatModel
from kbrouter.types import ChatMessage, ImagePart, Question, Trajectory

DEMO = Path(__file__).resolve().parents[2] / "demo"
FLAG = DEMO / "questions" / "flag.jpg"


def kind(messages: list[ChatMessage]) -> str:
    """Which prompt of the loop a request is (route / sub / final), from its system prompt."""
    system = messages[0].text()
    if "<ret>" in system:
        return "route"
    return "final" if "final answer" in system else "sub"


def route(sub_q: str | None, kb: str | None, think: str = "t") -> str:
    return (
        f"<think>{think}</think><sub-question>{sub_q or 'None'}</sub-question>"
        f"<ret>{kb or 'None'}</ret>"
    )


class Script:
    """Scripted replies per prompt kind; records the messages of each kind."""

    def __init__(
        self,
        routes: Iterable[str],
        subs: Iterable[str] | Callable[[list[ChatMessage]], str] = (),
        final: str = "<think>done</think><answer>FINAL</answer>",
    ) -> None:
        self.routes = list(routes)
        self.subs = subs if callable(subs) else list(subs)
        self.final = final
        self.seen: dict[str, list[list[ChatMessage]]] = {"route": [], "sub": [], "final": []}

    def __call__(self, messages: list[ChatMessage]) -> str:
        k = kind(messages)
        self.seen[k].append(messages)
        if k == "route":
            return self.routes.pop(0)
        if k == "sub":
            if callable(self.subs):
                return self.subs(messages)
            return self.subs.pop(0) if self.subs else "<answer>sub</answer>"
        return self.final


def run(
    kbs,
    script: Script,
    question: Question | str,
    *,
    max_steps: int = 3,
    fail_at: Iterable[int] = (),
    supports_images: bool = False,
    supports_grammar: bool = False,
    use_grammar: bool = True,
    events: list[TraceEvent] | None = None,
    min_retrieval_steps: int = 0,
) -> tuple[Trajectory, ScriptedChatModel]:
    """The loop in the paper's setting (the router may stop at once) unless told otherwise."""
    model = ScriptedChatModel(
        script,
        fail_at=fail_at,
        supports_images=supports_images,
        supports_grammar=supports_grammar,
    )
    engine = Engine(
        model,
        kbs,
        R1RouterPolicy(min_retrieval_steps=min_retrieval_steps, **PAPER_READING),
        EngineConfig(max_steps=max_steps, use_grammar=use_grammar),
        on_event=events.append if events is not None else None,
    )
    return engine.answer_sync(question), model


def test_two_hops_then_stop_records_everything(demo_kbs):
    """A two-hop run: routing, retrieval from the chosen KB, sub-answers, stop, final answer."""
    script = Script(
        routes=[
            route("Which country's capital is Canberra?", "Text Retriever"),
            route("What is the population of Australia?", "tables"),
            route(None, None, think="enough"),
        ],
        subs=["<think>e1</think><answer>Australia</answer>", "<answer>26 million</answer>"],
        final="<think>so</think><answer>26 million</answer>",
    )
    traj, model = run(demo_kbs, script, "How many people live in the country of Canberra?")

    assert traj.error is None
    assert traj.stop_reason == "answered"
    assert traj.answer == "26 million"
    assert [s.index for s in traj.steps] == [0, 1, 2]
    s0, s1, s2 = traj.steps
    assert s0.action is not None and s0.action.kbs == ["text"]
    assert s0.retrievals[0].kb == "text"
    assert "canberra" in [e.id for e in s0.retrievals[0].evidence]
    assert s0.sub_answer == "Australia"
    assert s1.action is not None and s1.action.kbs == ["tables"]
    assert s1.retrievals[0].evidence and s1.retrievals[0].evidence[0].table is not None
    assert s1.sub_answer == "26 million"
    assert s2.action is not None and s2.action.is_stop and s2.retrievals == []
    assert len(traj.model_calls()) == 3 + 2 + 1
    assert model.calls == 6
    # Table evidence is rendered compactly (pipe-separated header) in the sub-answer prompt.
    sub_prompt = script.seen["sub"][1][-1].text()
    assert "[tables]" in sub_prompt and " | " in sub_prompt
    # The second route call sees the first hop.
    assert "Answer 1: Australia" in script.seen["route"][1][-1].text()
    # The final answer sees the full history.
    final_user = script.seen["final"][0][-1].text()
    assert "Sub-question 1: Which country's capital is Canberra?" in final_user
    assert "Answer 2: 26 million" in final_user
    # The trajectory round-trips through JSON.
    assert Trajectory.model_validate_json(traj.model_dump_json()) == traj


def test_corrective_retry_after_bad_format(demo_kbs):
    """A bad router output is re-asked with a message naming the problem; the retry is used."""
    script = Script(
        routes=[
            "I think we should search the text KB.",
            route("Who designed Brasília?", "text"),
            route(None, None),
        ]
    )
    traj, _ = run(demo_kbs, script, "Which architect designed Brasília?")
    step = traj.steps[0]
    assert len(step.route_calls) == 2
    assert step.action is not None and step.action.kbs == ["text"]
    assert any("retry 1 of 2" in n and "missing <sub-question>" in n for n in step.notes)
    retry_msgs = script.seen["route"][1]
    assert retry_msgs[-2].role == "assistant"
    assert retry_msgs[-2].text() == "I think we should search the text KB."
    assert retry_msgs[-1].role == "user"
    assert "missing <sub-question>" in retry_msgs[-1].text()
    # The retry keeps the original prompt as its prefix (KV cache reuse).
    assert retry_msgs[:-2] == script.seen["route"][0]
    assert traj.stop_reason == "answered"


def test_unknown_kb_is_corrected_with_known_names(demo_kbs):
    """An unknown KB name is rejected; the correction lists the registry's names."""
    script = Script(routes=[route("Q?", "Wikipedia"), route("Q?", "images"), route(None, None)])
    traj, _ = run(demo_kbs, script, "Q?")
    correction = script.seen["route"][1][-1].text()
    assert "'Wikipedia'" in correction
    assert "text, tables, images" in correction
    assert traj.steps[0].action is not None and traj.steps[0].action.kbs == ["images"]


def test_format_fallback_after_bounded_retries(demo_kbs):
    """After 1 + 2 bad outputs the loop stops and still answers, saying why."""
    script = Script(routes=["garbage"] * 3)
    traj, model = run(demo_kbs, script, "What is the capital of Peru?")
    assert traj.stop_reason == "format_fallback"
    assert len(traj.steps) == 1
    step = traj.steps[0]
    assert len(step.route_calls) == 3 and step.action is None and step.retrievals == []
    assert "no retries left" in step.notes[-1]
    assert traj.final_call is not None and traj.answer == "FINAL"
    assert model.calls == 4
    assert traj.error is None


def test_budget_ends_loop_and_final_sees_all_hops(demo_kbs):
    """A router that never stops is cut at max_steps; the final answer sees every hop."""
    script = Script(routes=[route(f"Question {i}?", "text") for i in range(5)])
    traj, _ = run(demo_kbs, script, "Endless?", max_steps=2)
    assert traj.stop_reason == "budget"
    assert len(traj.steps) == 2
    assert all(s.sub_answer == "sub" for s in traj.steps)
    assert "budget" in traj.steps[-1].notes[-1]
    final_user = script.seen["final"][0][-1].text()
    assert "Sub-question 1: Question 0?" in final_user
    assert "Sub-question 2: Question 1?" in final_user


def test_stop_at_first_step_is_no_retrieval(demo_kbs):
    """None/None at the first step answers directly, without any retrieval."""
    traj, _ = run(demo_kbs, Script(routes=[route(None, None)]), "What is 2 + 2?")
    assert traj.stop_reason == "no_retrieval"
    assert traj.retrievals() == []
    final = traj.final_call.messages[-1].text()
    # no copyable placeholder for the empty history (small models answered "None yet?")
    assert "none yet" not in final.lower() and "Answers found so far" not in final
    assert final == "Question: What is 2 + 2?\nWhat is the answer to the question?"


def test_final_prompt_leaves_out_hops_without_an_answer(demo_kbs):
    from kbrouter.policies.prompts import Hop, PromptBuilder

    builder = PromptBuilder(demo_kbs.infos, supports_images=False)
    text = builder.final_messages(
        Question(text="Q?"), [Hop("Which flag?", "Australia"), Hop("Capital?", "")]
    )[-1].text()
    assert "Sub-question 1: Which flag?\nAnswer 1: Australia" in text
    assert "Capital?" not in text and "no answer found" not in text


def test_multiple_kbs_in_ret_are_all_queried(demo_kbs):
    """A comma-separated <ret> queries every KB; the sub-answer sees evidence of each."""
    script = Script(routes=[route("What is the capital of Australia?", "text, Table Retriever")])
    script.routes.append(route(None, None))
    traj, _ = run(demo_kbs, script, "Capital of Australia?")
    step = traj.steps[0]
    assert [r.kb for r in step.retrievals] == ["text", "tables"]
    assert all(r.evidence for r in step.retrievals)
    sub_prompt = script.seen["sub"][0][-1].text()
    assert "[text]" in sub_prompt and "[tables]" in sub_prompt


def test_top_k_limits_evidence_shown(demo_kbs):
    """The sub-answer prompt shows at most top_k items per KB even when more were retrieved."""
    script = Script(routes=[route("capital city country population", "text"), route(None, None)])
    traj, _ = run(demo_kbs, script, "q")
    assert len(traj.steps[0].retrievals[0].evidence) > 5  # retrieve_k = 10
    sub_prompt = script.seen["sub"][0][-1].text()
    assert "(5) [text]" in sub_prompt and "(6) [text]" not in sub_prompt


def test_empty_retrieval_is_noted_and_answered(demo_kbs):
    """A query that matches nothing gives an empty retrieval, a note, and still a sub-answer."""
    script = Script(routes=[route("zzzqx qqqwv?", "text"), route(None, None)])
    traj, _ = run(demo_kbs, script, "zzzqx?")
    step = traj.steps[0]
    assert step.retrievals[0].evidence == [] and step.retrievals[0].error is None
    assert any("no evidence" in n for n in step.notes)
    assert "(no evidence was found)" in script.seen["sub"][0][-1].text()
    assert step.sub_answer == "sub"


def test_model_error_mid_run_falls_back_to_final_answer(demo_kbs):
    """A backend failure at the sub-answer stops the loop; the final answer is still made."""
    script = Script(routes=[route("Who designed Brasília?", "text")])
    traj, _ = run(demo_kbs, script, "Architect of Brasília?", fail_at=[1])
    step = traj.steps[0]
    assert step.answer_call is not None and "scripted failure at call 1" in step.answer_call.error
    assert any("sub-answer call failed" in n for n in step.notes)
    assert traj.stop_reason == "error"
    assert traj.answer == "FINAL" and traj.error is None


def test_router_error_then_final_error_sets_trajectory_error(demo_kbs):
    """When the router and the final call both fail, the trajectory says so (no exception)."""
    traj, _ = run(demo_kbs, Script(routes=[]), "Anything?", fail_at=[0, 1])
    assert traj.stop_reason == "error"
    assert "router call failed" in traj.steps[0].notes[0]
    assert traj.error is not None and "final answer call failed" in traj.error
    assert traj.answer == ""


def test_text_only_model_is_told_about_the_image_and_image_kb_gets_it(demo_kbs):
    """A text-only model gets an image note naming the image KB; only the image KB query
    carries the question image."""
    script = Script(
        routes=[
            route("Which country's flag is shown?", "images, text"),
            route(None, None),
        ]
    )
    q = Question(text="Whose flag is this?", image=FLAG)
    traj, _ = run(demo_kbs, script, q)
    route_user = script.seen["route"][0][-1]
    assert route_user.images() == []
    assert 'with the "images" knowledge base' in route_user.text()
    by_kb = {r.kb: r for r in traj.steps[0].retrievals}
    assert by_kb["images"].query.image == FLAG
    assert by_kb["text"].query.image is None
    assert "cannot see it" in script.seen["final"][0][-1].text()


def test_image_model_gets_the_image_part(demo_kbs):
    """An image-capable backend gets the question image as an ImagePart, not a note."""
    script = Script(routes=[route("Which flag is shown?", "images"), route(None, None)])
    run(demo_kbs, script, Question(text="Whose flag?", image=FLAG), supports_images=True)
    for k in ("route", "sub", "final"):
        last = script.seen[k][0][-1]
        assert isinstance(last.content, list) and isinstance(last.content[0], ImagePart)
        assert "cannot see" not in last.text()


@pytest.mark.parametrize(
    ("supports", "use", "expect"), [(True, True, True), (False, True, False), (True, False, False)]
)
def test_grammar_offered_only_when_supported_and_enabled(demo_kbs, supports, use, expect):
    """Router calls carry the GBNF grammar iff the backend enforces it and it is switched on;
    so does the final answer call (the answer grammar)."""
    _, model = run(
        demo_kbs,
        Script(routes=[route(None, None)]),
        "q",
        supports_grammar=supports,
        use_grammar=use,
    )
    route_params = model.requests[0][1]
    assert (route_params.grammar is not None) == expect
    if expect:
        assert route_params.grammar == route_grammar(["text", "tables", "images"])
    final_params = model.requests[1][1]
    assert final_params.grammar == (answer_grammar() if expect else None)


def test_prompt_prefix_is_identical_across_steps_and_questions(demo_kbs):
    """System prompt + few-shot turns never change, so the KV cache prefix is reused."""
    s1 = Script(routes=[route("A?", "text"), route(None, None)])
    s2 = Script(routes=[route(None, None)])
    run(demo_kbs, s1, "First question?")
    run(demo_kbs, s2, "Second question?", max_steps=1)
    prefixes = [m[:-1] for m in s1.seen["route"] + s2.seen["route"]]
    assert all(p == prefixes[0] for p in prefixes)
    # one example per KB plus a stop example, each a user/assistant pair
    assert len(prefixes[0]) == 1 + 2 * (3 + 1)


def test_events_follow_the_loop(demo_kbs):
    """Progress events arrive in loop order and end with the final trajectory."""
    events: list[TraceEvent] = []
    script = Script(routes=[route("What is the capital of Australia?", "text"), route(None, None)])
    traj, _ = run(demo_kbs, script, "q", events=events)
    kinds = [e.kind for e in events]
    assert kinds == ["route", "retrieve", "sub_answer", "route", "final"]
    assert events[-1].trajectory is traj


def test_min_retrieval_steps_rejects_an_early_stop(demo_kbs):
    """With min_retrieval_steps=1 a None/None at step 1 is re-asked; the retry retrieves."""
    script = Script(
        routes=[route(None, None), route("Who designed Brasília?", "text"), route(None, None)]
    )
    model = ScriptedChatModel(script, supports_grammar=True)
    policy = R1RouterPolicy(min_retrieval_steps=1)
    traj = Engine(model, demo_kbs, policy).answer_sync("Architect of Brasília?")
    first = traj.steps[0]
    assert len(first.route_calls) == 2
    assert "nothing has been retrieved yet" in first.notes[0]
    assert first.action is not None and first.action.kbs == ["text"]
    assert traj.steps[1].action is not None and traj.steps[1].action.is_stop
    assert traj.stop_reason == "answered"
    # The grammar of the first step has no stop branch; later steps have it.
    names = ["text", "tables", "images"]
    assert model.requests[0][1].grammar == route_grammar(names, allow_stop=False)
    later_route = [p for m, p in model.requests if kind(m) == "route"][-1]
    assert later_route.grammar == route_grammar(names)


def test_one_min_retrieval_steps_default_for_ask_and_eval():
    """The policy config is the one place: `ask` (no --min-steps) and `eval` agree."""
    from kbrouter.cli.ask_cmd import _policy
    from kbrouter.policies.baselines import make_policy
    from kbrouter.policies.learned import LearnedRouterConfig

    assert R1RouterPolicy().config.min_retrieval_steps == 1
    assert LearnedRouterConfig().min_retrieval_steps == 0
    assert _policy("r1-router", None, None).config == make_policy("r1-router").config
    assert _policy("random-kb", None, None).config == make_policy("random-kb").config
    assert _policy("r1-router", None, 0).config.min_retrieval_steps == 0


class TrainedScriptedModel(ScriptedChatModel):
    """A scripted model that says it was fine-tuned with the compact router prompt (as an
    exported GGUF records in its metadata)."""

    @property
    def prompt_variant(self) -> str | None:
        return "compact"


@pytest.mark.parametrize(
    ("model_cls", "setting", "expected"),
    [
        (ScriptedChatModel, "auto", "full"),
        (TrainedScriptedModel, "auto", "compact"),
        (TrainedScriptedModel, "full", "full"),
        (ScriptedChatModel, "compact", "compact"),
    ],
)
def test_router_prompt_follows_the_model_record(demo_kbs, model_cls, setting, expected):
    """``router_prompt="auto"`` uses the variant the model records; an explicit setting wins.
    The compact prompt has no few-shot turns and is much shorter than the full one."""
    script = Script(routes=[route("Which country is Canberra in?", "text"), route(None, None)])
    model = model_cls(script)
    engine = Engine(
        model,
        demo_kbs,
        R1RouterPolicy(router_prompt=setting, **PAPER_READING),
        EngineConfig(max_steps=2),
    )
    traj = engine.answer_sync("How many people live in the country of Canberra?")
    assert traj.config["router_prompt_used"] == expected
    first_route = script.seen["route"][0]
    if expected == "compact":
        assert len(first_route) == 2  # system + the question: no few-shot turns
        assert first_route[0].text().startswith("Answer the question one retrieval at a time")
    else:
        assert len(first_route) > 2  # few-shot turns
        assert "question decomposition expert" in first_route[0].text()


def test_router_prompt_follows_the_route_model_not_the_main_one(demo_kbs):
    """With a trained router for the ``route`` purpose only (``--model-for route=...``), "auto"
    is the variant that router records; the main model still writes the other calls."""
    router_script = Script(
        routes=[route("Which country is Canberra in?", "text"), route(None, None)]
    )
    reader_script = Script(routes=[])
    router = TrainedScriptedModel(router_script, name="trained router")
    reader = ScriptedChatModel(reader_script, name="reader")
    engine = Engine(
        reader,
        demo_kbs,
        R1RouterPolicy(**PAPER_READING),
        EngineConfig(max_steps=2),
        purpose_models={"route": router},
    )
    traj = engine.answer_sync("How many people live in the country of Canberra?")
    assert traj.config["router_prompt_used"] == "compact"
    assert len(router_script.seen["route"][0]) == 2  # system + the question: no few-shot turns
    assert not reader_script.seen["route"] and reader_script.seen["sub"]
    engine.close()

    # and the other way round: a prompted router next to a trained main model gets the full
    # few-shot prompt it needs
    trained_main = TrainedScriptedModel(Script(routes=[]), name="trained main")
    prompted = ScriptedChatModel(Script(routes=[route(None, None)]), name="prompted router")
    engine = Engine(
        trained_main,
        demo_kbs,
        R1RouterPolicy(**PAPER_READING, min_retrieval_steps=0),
        EngineConfig(max_steps=2),
        purpose_models={"route": prompted},
    )
    assert engine.answer_sync("Where is Canberra?").config["router_prompt_used"] == "full"
    engine.close()


class TerseScriptedModel(ScriptedChatModel):
    """A scripted model that records the terse router prompt (as an exported GGUF would)."""

    @property
    def prompt_variant(self) -> str | None:
        return "terse"


def test_terse_router_searches_with_the_question_as_asked_and_stops_with_ret_none(demo_kbs):
    """A router trained on the terse reply format: ``<ret>KB</ret>`` alone searches that KB with
    the question as asked, a sub-question tag after it searches with the sub-question, and
    ``<ret>None</ret>`` stops. The grammar offered is the terse one (no think block)."""
    question = "Which country is Canberra the capital of?"
    script = Script(
        routes=[
            "<ret>text</ret>",
            "<ret>tables</ret>\n<sub-question>Where is Canberra?</sub-question>",
            "<ret>None</ret>",
        ]
    )
    model = TerseScriptedModel(script, supports_grammar=True)
    engine = Engine(model, demo_kbs, R1RouterPolicy(**PAPER_READING), EngineConfig(max_steps=3))
    traj = engine.answer_sync(question)
    assert traj.config["router_prompt_used"] == "terse"
    searches = [(r.query.text, r.kb) for s in traj.steps for r in s.retrievals]
    assert searches == [(question, "text"), ("Where is Canberra?", "tables")]
    assert traj.steps[-1].action is not None and traj.steps[-1].action.is_stop
    assert len(script.seen["route"]) == 3 and traj.stop_reason == "answered"
    first = script.seen["route"][0]
    assert len(first) == 2  # no few-shot turns
    assert first[0].text().startswith("Answer the question one retrieval at a time. Reply with")
    grammar = model.requests[0][1].grammar  # min_retrieval_steps=1: no stop branch at hop 1
    assert grammar == route_grammar(["text", "tables", "images"], allow_stop=False, terse=True)
    assert "<think>" not in grammar
    assert model.requests[-2][1].grammar == route_grammar(["text", "tables", "images"], terse=True)
