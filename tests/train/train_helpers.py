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


def toy_sample(i: int, rng: random.Random, kb: str | None = None) -> StepSample:
    """'what is the <word> of <entity>?' -> table for statistics words, text otherwise."""
    is_table = rng.random() < 0.5
    word = rng.choice(TABLE_WORDS if is_table else TEXT_WORDS)
    kb = kb or ("table" if is_table else "text")
    return StepSample(
        step_type="ret",
        messages=[
            ChatMessage(role="system", content="R"),
            ChatMessage(role="user", content=f"what is the {word} of {rng.choice(ENTITIES)}?"),
        ],
        target=RouteTarget(query="x", retrievers=[kb]),
        source="toy",
        trajectory_id=f"toy-{i}",
        response=f"<sub-question>x</sub-question><ret>{kb}</ret>",
    )


def warmup_data() -> list[StepSample]:
    """SFT warm start: the tag format with deliberately inverted routing (3 of 4 copies of each
    question name the wrong KB), so the model learns the format and a prompt-dependent route
    that Step-GRPO then has to correct."""
    rng = random.Random(0)
    out = []
    for i in range(32):
        base = toy_sample(i, rng)
        right = base.target.retrievers[0]
        wrong = "text" if right == "table" else "table"
        for kb in (wrong, wrong, wrong, right):
            out.append(
                base.model_copy(
                    update={
                        "target": RouteTarget(query="x", retrievers=[kb]),
                        "response": f"<sub-question>x</sub-question><ret>{kb}</ret>",
                    }
                )
            )
    return out


def tiny_llama(tokenizer, seed: int = 0, hidden: int = 32):  # noqa: ANN001, ANN201
    """A 2-layer randomly initialised Llama over the tokenizer's vocabulary (~1.6M params)."""
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
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(cfg)
