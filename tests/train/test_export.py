"""``kbrouter train export``: a LoRA run on a tiny model, merged, converted by llama.cpp's own
converter, quantised, and run by the llama.cpp backend, which reads the recorded prompt variant
and reproduces what the model was trained to write."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from train_helpers import tiny_llama

from kbrouter.errors import ConfigError
from kbrouter.train.steps import RouteTarget, StepSample
from kbrouter.types import ChatMessage, SamplingParams

pytestmark = pytest.mark.slow

PROMPT = [
    ChatMessage(role="system", content="Route the question to a knowledge base."),
    ChatMessage(role="user", content="Question: What was the population of Oslo in 2020?"),
]
TARGET = RouteTarget(query="What was the population of Oslo in 2020?", retrievers=["table"])


@pytest.fixture(scope="module")
def lora_run(smollm2_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA SFT run (adapter not merged) that overfits one router step."""
    from transformers import AutoTokenizer

    from kbrouter.train.config import LoRAConfig, SFTConfig
    from kbrouter.train.sft import train_sft

    root = tmp_path_factory.mktemp("export")
    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    base = root / "base"
    tiny_llama(tok, seed=0).save_pretrained(base)
    tok.save_pretrained(base)
    sample = StepSample(step_type="ret", messages=PROMPT, target=TARGET, trajectory_id="t")
    config = SFTConfig(
        model=str(base),
        output_dir=root / "sft",
        learning_rate=1e-2,
        max_steps=120,
        per_device_train_batch_size=2,
        step_kinds=["ret"],
        logging_steps=20,
        use_cpu=True,
        lora=LoRAConfig(
            enabled=True,
            r=16,
            alpha=32,
            dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            merge_on_save=False,
        ),
    )
    result = train_sft([sample] * 2, config, use_teacher_response=False)
    assert (result.checkpoint / "adapter" / "adapter_config.json").is_file()
    assert not (result.checkpoint / "config.json").is_file()  # the adapter only
    return result.checkpoint


def test_export_round_trip_runs_in_llama_cpp(lora_run: Path, tmp_path: Path) -> None:
    from kbrouter.models.gguf import MANIFEST_KEY, read_kbrouter_metadata
    from kbrouter.models.llama_cpp import LlamaCppModel
    from kbrouter.policies.parser import parse_route
    from kbrouter.train.export import export_gguf

    out = export_gguf(lora_run, tmp_path / "router.gguf", quant="q8_0", router_prompt="compact")
    assert out.is_file()
    assert not list(tmp_path.glob(".router-export-*"))  # no temporary files left behind

    meta = read_kbrouter_metadata(out)
    assert meta["kbrouter.router_prompt"] == "compact"
    manifest = json.loads(meta[MANIFEST_KEY])
    assert manifest["quant"] == "q8_0"
    assert manifest["trainer"] == "sft"
    assert manifest["train_steps"] == 120
    assert Path(manifest["base_model"]).name == "base"

    model = LlamaCppModel(out, n_ctx=512, n_threads=2)
    try:
        assert model.prompt_variant == "compact"  # from the file's header: no weights loaded
        assert not model.loaded
        reply = asyncio.run(model.chat(PROMPT, SamplingParams(temperature=0.0, max_tokens=48)))
    finally:
        asyncio.run(model.aclose())
    action = parse_route(reply.text, lambda name: name)
    assert action.kbs == ["table"], reply.text
    assert action.sub_question == TARGET.query, reply.text


def test_export_takes_the_variant_the_run_recorded(lora_run: Path, tmp_path: Path) -> None:
    from kbrouter.train.export import export_gguf

    info = json.loads((lora_run / "kbrouter_train.json").read_text())
    # the run's router sample has no kbrouter router prompt: nothing to take, so a clear error
    assert info["router_prompt"] is None
    assert info["router_prompt_counts"] == {"None": 2}
    with pytest.raises(ConfigError, match="records no single router prompt variant"):
        export_gguf(lora_run, tmp_path / "router.gguf", quant="q8_0")
    assert not list(tmp_path.iterdir())  # nothing written


def test_export_errors_name_the_problem(tmp_path: Path) -> None:
    from kbrouter.train.export import export_gguf, merged_folder

    with pytest.raises(ConfigError, match="unknown quantisation"):
        export_gguf(tmp_path, tmp_path / "x.gguf", quant="q3_xyz")
    with pytest.raises(ConfigError, match="unknown router prompt"):
        export_gguf(tmp_path, tmp_path / "x.gguf", router_prompt="verbose")
    with pytest.raises(ConfigError, match="checkpoint folder not found"):
        merged_folder(tmp_path / "missing", tmp_path)
    with pytest.raises(ConfigError, match="checkpoint folder not found"):
        export_gguf(tmp_path / "missing", tmp_path / "x.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="neither a model folder"):
        merged_folder(tmp_path / "empty", tmp_path)
    adapter = tmp_path / "lora" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="names no base model"):
        merged_folder(tmp_path / "lora", tmp_path)
    with pytest.raises(ConfigError, match="no convert_hf_to_gguf.py"):
        from kbrouter.train.export import find_converter

        find_converter(tmp_path)


def test_step_grpo_starts_from_a_lora_run_and_the_stack_exports(
    lora_run: Path, tmp_path: Path
) -> None:
    """Step-GRPO from the SFT run's LoRA ``final`` (the adapter is merged into its base first),
    with its own LoRA and checkpoints: its run records the SFT run as its model, the export
    merges both adapters, and llama.cpp still writes the route the SFT run learnt."""
    from kbrouter.models.gguf import MANIFEST_KEY, read_kbrouter_metadata
    from kbrouter.models.llama_cpp import LlamaCppModel
    from kbrouter.policies.parser import parse_route
    from kbrouter.train.config import LoRAConfig, StepGRPOConfig
    from kbrouter.train.export import export_gguf
    from kbrouter.train.rewards import KBNames, RewardConfig
    from kbrouter.train.run import RESUME_FILE
    from kbrouter.train.step_grpo import train_step_grpo

    sample = StepSample(step_type="ret", messages=PROMPT, target=TARGET, trajectory_id="t")
    config = StepGRPOConfig(
        model=str(lora_run),
        output_dir=tmp_path / "grpo",
        learning_rate=1e-5,
        num_generations=2,
        per_device_train_batch_size=2,
        max_steps=2,
        save_steps=1,
        max_completion_length=64,
        logging_steps=1,
        rewards=RewardConfig(routing_weight=1.0, similarity_weight=0.0),
        use_cpu=True,
        # the tiny model's distribution is flat (its argmax is right): sample near-greedily
        temperature=0.02,
        lora=LoRAConfig(
            enabled=True, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]
        ),
    )
    kbs = KBNames({"text": [], "table": []})
    result = train_step_grpo([sample] * 2, config, kb_names=kbs)
    assert result.steps == 2
    assert (tmp_path / "grpo" / "base" / "config.json").is_file()  # the SFT merge, on disk
    assert (tmp_path / "grpo" / RESUME_FILE).is_file()
    info = json.loads((result.checkpoint / "kbrouter_train.json").read_text())
    assert info["trainer"] == "step-grpo"
    assert info["config"]["model"] == str(lora_run)
    assert info["router_prompt_counts"] == {"None": 2}
    routing = result.metric_series("rewards/routing_reward/mean")
    assert routing and all(r == 1.0 for r in routing)  # the SFT run already routes right

    # the finished run is not trained again: its last checkpoint is resumed at the end
    last = tmp_path / "grpo" / "checkpoint-2" / "adapter_model.safetensors"
    before = last.stat().st_mtime_ns
    again = train_step_grpo([sample] * 2, config, kb_names=kbs)
    assert again.steps == 2
    assert last.stat().st_mtime_ns == before
    assert sorted(p.name for p in (tmp_path / "grpo").glob("checkpoint-*")) == [
        "checkpoint-1",
        "checkpoint-2",
    ]

    out = export_gguf(
        result.checkpoint, tmp_path / "router.gguf", quant="q8_0", router_prompt="compact"
    )
    manifest = json.loads(read_kbrouter_metadata(out)[MANIFEST_KEY])
    assert manifest["trainer"] == "step-grpo"
    model = LlamaCppModel(out, n_ctx=512, n_threads=2)
    try:
        reply = asyncio.run(model.chat(PROMPT, SamplingParams(temperature=0.0, max_tokens=48)))
    finally:
        asyncio.run(model.aclose())
    action = parse_route(reply.text, lambda name: name)
    assert action.kbs == ["table"], reply.text


def test_lora_runs_naming_each_other_as_base_are_a_clear_error(tmp_path: Path) -> None:
    from kbrouter.train.modeling import load_causal_lm, load_tokenizer, model_source

    for name, base in (("a", "b"), ("b", "a")):
        (tmp_path / name / "adapter").mkdir(parents=True)
        (tmp_path / name / "adapter" / "adapter_config.json").write_text("{}")
        info = {"config": {"model": str(tmp_path / base)}}
        (tmp_path / name / "kbrouter_train.json").write_text(json.dumps(info))
    for load in (load_causal_lm, load_tokenizer, model_source):
        with pytest.raises(ConfigError, match="name each other as base models"):
            load(str(tmp_path / "a"))


def test_a_plain_peft_adapter_folder_names_its_base_in_its_config(tmp_path: Path) -> None:
    from kbrouter.train.modeling import model_source

    (tmp_path / "adapter").mkdir()
    cfg = {"base_model_name_or_path": "some-org/some-model"}
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(cfg))
    assert model_source(str(tmp_path))["base"] == {"id": "some-org/some-model"}
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="names no base model"):
        model_source(str(tmp_path))


def test_gguf_rollouts_run_the_exported_checkpoint_in_the_engine(
    lora_run: Path, tmp_path: Path
) -> None:
    """On-policy rollouts through llama.cpp: the round's checkpoint is exported once (the file
    is reused by a resumed run), loaded by the llama.cpp backend with its recorded prompt
    variant, and runs the R1-Router loop over real BM25 demo KBs."""
    from kbrouter.config import load_registry_config
    from kbrouter.eval.datasets import EvalExample
    from kbrouter.kb.registry import KBRegistry
    from kbrouter.models.llama_cpp import LlamaCppModel
    from kbrouter.policies.prompts import detect_router_prompt
    from kbrouter.testing import lexical_demo_config
    from kbrouter.train.config import OnPolicyConfig, StepGRPOConfig
    from kbrouter.train.onpolicy import engine_rollout, gguf_rollout_model
    from kbrouter.types import Question

    kb_dir = tmp_path / "kbs"
    kb_dir.mkdir()
    registry = KBRegistry.from_config(load_registry_config(lexical_demo_config(kb_dir)))
    assert registry.build(progress=False).ok
    config = StepGRPOConfig(
        model=str(lora_run),
        output_dir=tmp_path / "grpo",
        on_policy=OnPolicyConfig(enabled=True, max_retrieval_steps=2, rollout_temperature=1.0),
    )
    made: list[LlamaCppModel] = []

    def factory(spec: str) -> LlamaCppModel:
        model = gguf_rollout_model(
            tmp_path / "rollout-gguf", quant="q8_0", router_prompt="compact", n_threads=2
        )(spec)
        made.append(model)
        return model

    rollout = engine_rollout(registry, config, model_factory=factory, concurrency=2)
    examples = [
        EvalExample(
            id="q1", question=Question(text="Who designed Brasília?"), golds=["x"], source="d"
        )
    ]
    trajectories = asyncio.run(rollout(str(lora_run), examples))
    (gguf,) = list((tmp_path / "rollout-gguf").glob("*.gguf"))
    assert made[0].model_path == gguf and made[0].prompt_variant == "compact"
    (traj,) = trajectories
    calls = [c for s in traj.steps for c in s.route_calls]
    assert calls and all(c.error is None for c in calls), traj.model_dump_json()[:500]
    assert detect_router_prompt(calls[0].messages) == "compact"  # the variant in the file

    written = gguf.stat().st_mtime_ns
    asyncio.run(rollout(str(lora_run), examples))  # the same checkpoint: no second export
    assert gguf.stat().st_mtime_ns == written and len(made) == 2
    registry.close()
