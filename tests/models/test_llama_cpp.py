"""The in-process llama.cpp backend on the real packaged Qwen2.5-Coder-0.5B model."""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from kbrouter.errors import ModelError
from kbrouter.models.llama_cpp import LlamaCppModel
from kbrouter.policies.prompts import route_grammar
from kbrouter.types import ChatMessage, SamplingParams

pytest.importorskip("llama_cpp")
pytestmark = [pytest.mark.integration, pytest.mark.slow]

QUESTION = [
    ChatMessage(role="system", content="Answer in a few words."),
    ChatMessage(role="user", content="What is the capital of France?"),
]


@pytest.fixture(scope="module")
def model():
    m = LlamaCppModel(n_ctx=512)
    yield m
    asyncio.run(m.aclose())


def _chat(model: LlamaCppModel, messages=QUESTION, **params) -> object:
    return asyncio.run(model.chat(messages, SamplingParams(max_tokens=8, **params)))


def test_greedy_answer_has_usage(model: LlamaCppModel):
    """A greedy reply is non-empty and reports prompt and completion token counts."""
    result = _chat(model)
    assert "paris" in result.text.lower()
    assert result.prompt_tokens > 10
    assert 0 < result.completion_tokens <= 8
    assert result.seconds > 0


def test_same_seed_same_sample(model: LlamaCppModel):
    """Sampling at temperature 1 with the same seed reproduces the same text."""
    first = _chat(model, temperature=1.0, seed=11)
    second = _chat(model, temperature=1.0, seed=11)
    assert first.text == second.text


def test_grammar_constrains_output(model: LlamaCppModel):
    """A GBNF grammar forces the reply into its language."""
    result = _chat(model, grammar='root ::= "yes" | "no"')
    assert result.text in {"yes", "no"}


def test_route_grammar_without_its_stop_branch_cannot_write_none(model: LlamaCppModel):
    """Told to copy a stop, the model under the no-stop route grammar writes a sub-question
    that does not start with "None" and names a KB (the grammar parses in llama.cpp)."""
    stop = "<think>done</think>\n<sub-question>None</sub-question>\n<ret>None</ret>"
    messages = [
        ChatMessage(role="system", content="Repeat the user's message exactly."),
        ChatMessage(role="user", content=stop),
    ]
    grammar = route_grammar(["text", "tables"], allow_stop=False)
    result = asyncio.run(model.chat(messages, SamplingParams(max_tokens=160, grammar=grammar)))
    assert "<sub-question>" in result.text
    sub_question = result.text.split("<sub-question>", 1)[1]
    assert sub_question.strip() and not sub_question.startswith(("None", " "))
    assert "<ret>text" in result.text or "<ret>tables" in result.text


def test_terse_route_grammar_parses_in_llama_cpp_and_its_replies_parse(model: LlamaCppModel):
    """The terse router grammar is valid GBNF for llama.cpp; the packaged model, prompted with
    the terse router prompt, replies without a think block, and the reply parses (a reply with
    only ``<ret>`` searches with the question as asked)."""
    from kbrouter.kb.base import KBInfo
    from kbrouter.policies.prompts import PromptBuilder
    from kbrouter.types import Modality, Question

    kbs = [
        KBInfo(name="text", description="Wikipedia passages.", modality=Modality.TEXT),
        KBInfo(name="tables", description="Country tables.", modality=Modality.TABLE),
    ]
    builder = PromptBuilder(kbs, supports_images=False, router_prompt="terse")
    question = Question(text="What is the capital of Australia?")
    for allow_stop in (False, True):
        params = SamplingParams(max_tokens=80, grammar=builder.route_grammar(allow_stop=allow_stop))
        result = asyncio.run(model.chat(builder.route_messages(question, []), params))
        assert "<think>" not in result.text and "<ret>" in result.text
        action = builder.parse_route(result.text, lambda name: name, question)
        assert action.is_stop or (action.sub_question and action.kbs[0] in {"text", "tables"})
        if "<sub-question>" not in result.text and not action.is_stop:
            assert action.sub_question == question.text


def test_invalid_grammar_is_model_error(model: LlamaCppModel):
    """A grammar llama.cpp cannot parse raises ModelError instead of crashing the process."""
    with pytest.raises(ModelError, match="invalid GBNF grammar"):
        _chat(model, grammar="root ::= undefined-rule")


def test_prompt_longer_than_context_is_model_error(model: LlamaCppModel):
    """A prompt over n_ctx raises ModelError naming the context window."""
    long = [ChatMessage(role="user", content="word " * 800)]
    with pytest.raises(ModelError, match="context window of 512"):
        _chat(model, messages=long)


def test_concurrent_calls_are_serialised(model: LlamaCppModel):
    """Concurrent chats on one model all complete (the llama object is used by one at a time)."""

    async def both():
        params = SamplingParams(max_tokens=2)
        return await asyncio.gather(model.chat(QUESTION, params), model.chat(QUESTION, params))

    a, b = asyncio.run(both())
    assert a.text == b.text and a.completion_tokens > 0


def test_prompt_switches_restore_kv_state_exactly(model: LlamaCppModel):
    """Alternating two prompt families restores saved KV states without changing greedy output."""
    rules = "Reply with one short sentence. Be factual and precise. " * 8
    a = [
        ChatMessage(role="system", content=rules),
        ChatMessage(role="user", content="Name a fruit."),
    ]
    b = [ChatMessage(role="system", content="You translate English to French."), QUESTION[1]]
    first = _chat(model, messages=a)
    _chat(model, messages=b)
    assert len(model._states) >= 1  # the state of `a` was saved at the switch
    again = _chat(model, messages=a)
    assert again.text == first.text
    assert again.prompt_tokens == first.prompt_tokens
    # With room for one saved state, saving the current state evicts the one to restore;
    # the restore must still happen (this used to raise KeyError inside the cache).
    budget = model.config.cache_bytes
    model.config.cache_bytes = 1
    c = [ChatMessage(role="system", content="You list prime numbers. " * 12), QUESTION[1]]
    try:
        _chat(model, messages=c)  # a third family: its state is new, so saving it evicts a's
        assert _chat(model, messages=a).text == first.text
    finally:
        model.config.cache_bytes = budget


def test_identity_is_the_gguf_content_not_its_path_or_threads(tmp_path):
    """The replay cache and resume checks key on this: a copy elsewhere (another machine) with
    another thread count is the same model; changed weights are not."""
    from kbrouter.models.llama_cpp import LlamaCppModel

    a = tmp_path / "a" / "m.gguf"
    b = tmp_path / "b" / "copy.gguf"
    for p in (a, b):
        p.parent.mkdir()
        p.write_bytes(b"GGUF" + b"\x00" * 1000)
    ida = LlamaCppModel(a, n_threads=1).identity()
    assert ida == LlamaCppModel(b, n_threads=2).identity()
    assert "path" not in str(ida) and "threads" not in str(ida)
    assert ida["gguf_sha256"] == hashlib.sha256(a.read_bytes()).hexdigest()
    b.write_bytes(b"GGUF" + b"\x01" * 1000)
    assert LlamaCppModel(b).identity() != ida
    assert LlamaCppModel(a, n_ctx=1024).identity() != ida  # context size changes outputs


def test_lazy_grammar_is_the_full_mask_greedy_output(model: LlamaCppModel):
    """Greedy grammar calls check the top token first and mask the vocabulary only when the
    grammar refuses it: the replies are the ones llama-cpp-python's own grammar sampler gives,
    on steps where the top token was allowed and on steps where it was not."""
    from kbrouter.models.llama_cpp import LlamaCppConfig
    from kbrouter.policies.prompts import answer_grammar

    copy_stop = [
        ChatMessage(role="system", content="Repeat the user's message exactly."),
        ChatMessage(
            role="user",
            content="<think>done</think>\n<sub-question>None</sub-question>\n<ret>None</ret>",
        ),
    ]
    cases = [
        (QUESTION, 'root ::= "yes" | "no"'),  # the top token ("Paris") is refused
        (QUESTION, answer_grammar()),
        (copy_stop, route_grammar(["text", "tables"], allow_stop=False)),
        (copy_stop, route_grammar(["text", "tables"], allow_stop=True)),
    ]
    reference = LlamaCppModel(config=LlamaCppConfig(n_ctx=512, lazy_grammar=False))
    try:
        for messages, grammar in cases:
            params = SamplingParams(max_tokens=60, grammar=grammar)
            before = dict(model.grammar_stats)
            lazy = asyncio.run(model.chat(messages, params))
            full = asyncio.run(reference.chat(messages, params))
            assert lazy.text == full.text, grammar
            assert lazy.completion_tokens == full.completion_tokens
            assert model.grammar_stats["steps"] > before.get("steps", 0)
    finally:
        asyncio.run(reference.aclose())
    assert not reference.grammar_stats  # lazy_grammar=False: llama-cpp-python's sampler
    stats = model.grammar_stats
    assert 0 < stats["full_masks"] < stats["steps"]  # both paths were taken
