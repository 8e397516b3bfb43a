"""Step-GRPO rewards on hand-made cases: format gate, routing (alias-normalised), sub-question
similarity (real MiniLM encoder), answer (binary vs continuous recall), retrieval cost, the
paper preset's weighting and the TRL callables."""

from __future__ import annotations

import json

import pytest

from kbrouter.kb.base import KBInfo
from kbrouter.train.rewards import (
    KBNames,
    RewardConfig,
    StepRewarder,
    answer_reward,
    cosine_similarity_reward,
    decode_target,
    encode_target,
    format_reward,
    is_binary_answer,
    retrieval_cost_penalty,
    routing_reward,
    similarity_rewards,
    trl_reward_funcs,
)
from kbrouter.train.steps import RouteTarget
from kbrouter.types import Modality, Question

ROUTE_TEXT = (
    "<think>need the director</think>\n<sub-question>Who directed Jaws?</sub-question>\n"
    "<ret>Text Retriever</ret>"
)
STOP = "<think>done</think><sub-question>None</sub-question><ret>None</ret>"


@pytest.fixture(scope="module")
def minilm():
    from kbrouter.encoders.text import load_text_encoder

    return load_text_encoder("minilm")


def test_format_reward() -> None:
    """Router outputs need both tags with known KBs or None/None; answers need <answer>."""
    assert format_reward(ROUTE_TEXT, "ret") == 1.0
    assert format_reward(STOP, "ret") == 1.0
    assert format_reward("<sub-question>Who?</sub-question>", "ret") == 0.0  # no <ret>
    assert format_reward("<sub-question>Who?</sub-question><ret>Web Search</ret>", "ret") == 0.0
    assert format_reward("<sub-question>None</sub-question><ret>Text Retriever</ret>", "ret") == 0.0
    assert format_reward("<think>x</think><answer>Paris</answer>", "ans") == 1.0
    assert format_reward("Paris", "ans") == 0.0
    assert format_reward("<answer> </answer>", "ans") == 0.0


def test_kb_names_alias_normalisation() -> None:
    """Registry names, aliases and the paper's spellings resolve case/space-insensitively."""
    names = KBNames(
        [KBInfo(name="wiki", description="d", modality=Modality.TEXT, aliases=["Text Retriever"])]
    )
    assert names.resolve("TEXT  retriever") == "wiki"
    assert names.resolve("text_retriever") == "wiki"
    assert KBNames().resolve("table retriever") == "Table Retriever"
    assert KBNames().resolve("tir") == "Text Image Retriever"
    with pytest.raises(KeyError, match="unknown knowledge base 'web'"):
        names.resolve("web")


def test_routing_reward() -> None:
    target = RouteTarget(query="q", retrievers=["text retriever"])
    assert routing_reward(["Text Retriever"], target) == 1.0
    assert routing_reward(["Table Retriever"], target) == 0.0
    assert routing_reward(["Text Retriever", "Table Retriever"], target) == 0.0  # not exactly one
    assert routing_reward([], target) == 0.0
    stop = RouteTarget()
    assert routing_reward([], stop) == 1.0
    assert routing_reward(["Text Retriever"], stop) == 0.0


def test_similarity_reward(minilm) -> None:
    """Paraphrases score high, unrelated questions low, identical ~1; stop handling."""
    same = cosine_similarity_reward("Who directed Jaws?", "Who directed Jaws?", minilm)
    para = cosine_similarity_reward(
        "Who is the director of Jaws?", "Who directed the film Jaws?", minilm
    )
    other = cosine_similarity_reward(
        "Who directed Jaws?", "What is the GDP of Japan in 2020?", minilm
    )
    assert same == pytest.approx(1.0, abs=1e-4)
    assert para > 0.7 > other
    assert other >= 0.0
    assert similarity_rewards([(None, None), ("q", None), (None, "q")], None) == [1.0, 0.0, 0.0]


def test_answer_reward_binary_and_continuous() -> None:
    """Binary iff one gold of <= 5 words or several golds; continuous for one long gold."""
    assert is_binary_answer(["9 December 1899"]) and is_binary_answer(["a b c d e f", "x"])
    assert not is_binary_answer(["frank wisbar was born on december 9, 1899."])
    assert answer_reward("He was born on 9 December 1899.", ["9 December 1899"]) == 1.0
    assert answer_reward("December 1899", ["9 December 1899"]) == 0.0  # recall 2/3 -> binary 0
    long_gold = "frank wisbar was born on december 9 1899 in germany"  # 10 tokens
    assert answer_reward("frank wisbar was born in germany", long_gold) == pytest.approx(0.6)
    assert answer_reward("Stockholm", ["Mälaren", "Baltic Sea"]) == 0.0
    assert answer_reward("the Baltic Sea", ["Mälaren", "Baltic Sea"]) == 1.0
    assert answer_reward(None, ["x"]) == 0.0
    assert answer_reward("December 1899", ["9 December 1899"], mode="continuous") == pytest.approx(
        2 / 3
    )


def test_retrieval_cost_penalty() -> None:
    assert retrieval_cost_penalty(["a", "b"], 0.1) == pytest.approx(-0.2)
    assert retrieval_cost_penalty([], 0.1) == 0.0


def test_paper_preset_step_reward(minilm) -> None:
    """ret = 0.5 cos + 0.5 routing; ans = answer; unparsable -> 0 (gate)."""
    rw = StepRewarder(RewardConfig.paper(), encoder=minilm)
    target = RouteTarget(query="Who directed Jaws?", retrievers=["text retriever"])
    r = rw.score(ROUTE_TEXT, "ret", target)
    assert r.parsed and r.routing == 1.0 and r.similarity == pytest.approx(1.0, abs=1e-4)
    assert r.total == pytest.approx(1.0, abs=1e-4)
    wrong_kb = ROUTE_TEXT.replace("Text Retriever", "Table Retriever")
    assert rw.score(wrong_kb, "ret", target).total == pytest.approx(0.5, abs=1e-4)
    assert rw.score("Who directed Jaws? use text", "ret", target).total == 0.0
    assert rw.score(STOP, "ret", RouteTarget()).total == 1.0
    assert rw.score("<answer>1899</answer>", "ans", ["1899"]).total == 1.0
    assert rw.score("1899", "ans", ["1899"]).total == 0.0  # no tags -> gated


def test_weights_cost_and_gate_off(minilm) -> None:
    """Format bonus and retrieval cost are added; without the gate an untagged answer scores."""
    cfg = RewardConfig(format_weight=0.2, retrieval_cost=0.1, format_gate=False)
    rw = StepRewarder(cfg, encoder=minilm)
    target = RouteTarget(query="Who directed Jaws?", retrievers=["text retriever"])
    r = rw.score(ROUTE_TEXT, "ret", target)
    assert r.total == pytest.approx(0.2 + 0.5 + 0.5 - 0.1, abs=1e-4)
    loose = rw.score("The answer is 1899", "ans", ["1899"])
    assert loose.answer == 1.0 and loose.format == 0.0 and loose.total == pytest.approx(1.0)


def test_trl_reward_funcs_match_total(minilm) -> None:
    """The per-term TRL callables, weighted and summed, equal the combined reward; terms that
    do not apply return None; dataset columns arrive as keyword arguments."""
    rw = StepRewarder(RewardConfig(format_weight=0.1), encoder=minilm)
    funcs, weights = trl_reward_funcs(rw)
    assert [f.__name__ for f in funcs] == [
        "format_reward",
        "routing_reward",
        "similarity_reward",
        "answer_reward",
    ]
    targets = [RouteTarget(query="Who directed Jaws?", retrievers=["text retriever"]), ["1899"]]
    completions = [
        [{"role": "assistant", "content": ROUTE_TEXT}],
        [{"role": "assistant", "content": "<answer>1899</answer>"}],
    ]
    kwargs = {
        "step_type": ["ret", "ans"],
        "target": [encode_target(t) for t in targets],
        "final": [False, True],
    }
    per_term = [f(prompts=["p", "p"], completions=completions, **kwargs) for f in funcs]
    assert per_term[1][1] is None and per_term[3][0] is None
    totals = [
        sum(w * v[i] for w, v in zip(weights, per_term, strict=True) if v[i] is not None)
        for i in range(2)
    ]
    expected = [
        b.total
        for b in rw.score_batch([ROUTE_TEXT, "<answer>1899</answer>"], ["ret", "ans"], targets)
    ]
    assert totals == pytest.approx(expected)


def test_target_json_round_trip() -> None:
    t = RouteTarget(query="q", retrievers=["a"])
    assert decode_target("ret", encode_target(t)) == t
    assert decode_target("ans", encode_target(["x", "y"])) == ["x", "y"]
    assert decode_target("ans", encode_target("sub")) == "sub"
    assert json.loads(encode_target(RouteTarget())) == {"query": None, "retrievers": []}


def test_targets_naming_kbs_unknown_to_the_rewarder_are_a_clear_error():
    """Without the right --kbs, custom KB names would score zero routing reward silently."""
    from kbrouter.errors import ConfigError
    from kbrouter.train.config import StepGRPOConfig
    from kbrouter.train.step_grpo import train_step_grpo
    from kbrouter.train.steps import StepSample
    from kbrouter.types import ChatMessage

    def sample(kbs: list[str]) -> StepSample:
        return StepSample(
            step_type="ret",
            messages=[ChatMessage(role="user", content="q")],
            target=RouteTarget(query="q", retrievers=kbs),
            trajectory_id="t",
        )

    custom = KBNames([KBInfo(name="passages", description="d", modality=Modality.TEXT)])
    custom.check_targets([sample(["Passages"]), sample([])])  # known (any spelling) and stop
    with pytest.raises(
        ConfigError, match=r"'Text Retriever' \(1x\), 'text_retriever' \(1x\).*--kbs"
    ):
        custom.check_targets([sample(["Text Retriever"]), sample(["text_retriever"])])
    KBNames().check_targets([sample(["Text Retriever"])])  # the paper's names by default
    with pytest.raises(ConfigError, match="does not know: 'passages'"):
        train_step_grpo([sample(["passages"])], StepGRPOConfig(model="unused", output_dir="unused"))


def test_terse_router_replies_are_scored_with_the_question_of_their_prompt(minilm) -> None:
    """Steps built with the terse router prompt may reply ``<ret>KB</ret>`` alone (a search with
    the question as asked) or ``<ret>None</ret>`` (a stop): the TRL reward reads the question
    from the prompt column, so both parse and earn the routing reward; the same reply to a
    compact prompt is a format failure."""
    from kbrouter.policies.prompts import PromptBuilder
    from kbrouter.train.records import message_dict

    kbs = [KBInfo(name="text retriever", description="Passages.", modality=Modality.TEXT)]
    question = "Who directed Jaws?"

    def prompt(variant: str) -> list[dict[str, str]]:
        builder = PromptBuilder(kbs, supports_images=False, router_prompt=variant)
        return [message_dict(m) for m in builder.route_messages(Question(text=question), [])]

    rw = StepRewarder(RewardConfig(format_weight=0.1), encoder=minilm)
    funcs, _ = trl_reward_funcs(rw, terms=["format", "routing", "similarity"])
    targets = [
        RouteTarget(query=question, retrievers=["text retriever"]),
        RouteTarget(query=None, retrievers=[]),
        RouteTarget(query=question, retrievers=["text retriever"]),
    ]
    replies = ["<ret>text retriever</ret>", "<ret>None</ret>", "<ret>text retriever</ret>"]
    kwargs = {
        "prompts": [prompt("terse"), prompt("terse"), prompt("compact")],
        "completions": [[{"role": "assistant", "content": r}] for r in replies],
        "step_type": ["ret", "ret", "ret"],
        "target": [encode_target(t) for t in targets],
    }
    fmt, routing, similarity = (f(**kwargs) for f in funcs)
    assert fmt == [1.0, 1.0, 0.0]
    assert routing[:2] == [1.0, 1.0]
    assert similarity[0] == pytest.approx(1.0, abs=1e-5)  # the sub-question is the question
