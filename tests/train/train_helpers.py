"""Shared helpers of the training tests: a tiny random Llama and the toy routing task."""

from __future__ import annotations

import random

from kbrouter.train.rewards import KBNames, RewardConfig
from kbrouter.train.steps import RouteTarget, StepSample
from kbrouter.types import ChatMessage

TABLE_WORDS = ["population", "gdp"]
TEXT_WORDS = ["founder", "author"]
ENTITIES = ["paris", "tokyo", "apple", "lima", "oslo", "rome", "cairo", "delhi"]
KBS = KBNames({"text": [], "table": []})
ROUTING_ONLY = RewardConfig(routing_weight=1.0, similarity_weight=0.0)


def other_kb(kb: str) -> str:
    return "text" if kb == "table" else "table"


def with_kb(sample: StepSample, kb: str) -> StepSample:
    """The sample with ``kb`` as its target KB (and in its teacher response)."""
    return sample.model_copy(
        update={
            "target": RouteTarget(query="x", retrievers=[kb]),
            "response": f"<sub-question>x</sub-question><ret>{kb}</ret>",
        }
    )


def toy_sample(i: int, rng: random.Random, inverted: bool = False) -> StepSample:
    """'what is the <word> of <entity>?' -> table for statistics words, text otherwise
    (``inverted``: the other way round; just as learnable from the prompt)."""
    is_table = rng.random() < 0.5
    word = rng.choice(TABLE_WORDS if is_table else TEXT_WORDS)
    sample = StepSample(
        step_type="ret",
        messages=[
            ChatMessage(role="system", content="R"),
            ChatMessage(role="user", content=f"what is the {word} of {rng.choice(ENTITIES)}?"),
        ],
        target=RouteTarget(query="x", retrievers=["table"]),
        source="toy",
        trajectory_id=f"toy-{i}",
    )
    return with_kb(sample, "table" if is_table != inverted else "text")


def toy_set(n: int, seed: int, start: int = 0, inverted: bool = False) -> list[StepSample]:
    rng = random.Random(seed)
    return [toy_sample(start + i, rng, inverted) for i in range(n)]


def warmup_data() -> list[StepSample]:
    """SFT warm start: the tag format and a *weak* prompt-dependent route. Each of 32 questions
    appears 4 times, 3 naming the right KB and 1 the wrong one, so a model that fits the data
    routes right with probability ~0.75 and Step-GRPO has room to raise the routing reward
    (or, trained on the inverted rule, to push the routing the other way)."""
    out = []
    for base in toy_set(32, seed=0):
        right = base.target.retrievers[0]
        out += [with_kb(base, kb) for kb in (right, right, right, other_kb(right))]
    return out


def tiny_llama(tokenizer, seed: int = 0, hidden: int = 64, init: float = 0.1, context: int = 512):  # noqa: ANN001, ANN201, E501
    """A 2-layer randomly initialised Llama over the tokenizer's vocabulary (~3.3M params).

    ``init`` is the weight init std. At Llama's default 0.02 the attention logits start near
    zero and stay on a plateau: even SFT on correct labels needs ~300 updates before the KB
    token attends to the question's keyword. At 0.1 it does within ~100 updates."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=context,
        tie_word_embeddings=True,
        initializer_range=init,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(cfg)
