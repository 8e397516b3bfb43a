"""SFT resume: only the same training (settings + data) continues, from a complete checkpoint;
and the router prompt variant of step samples is recognised from their messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from kbrouter.errors import ConfigError
from kbrouter.policies.prompts import PromptBuilder, detect_router_prompt
from kbrouter.train.config import SFTConfig
from kbrouter.train.run import RESUME_FILE
from kbrouter.train.sft import resume_checkpoint
from kbrouter.train.steps import RouteTarget, StepSample
from kbrouter.types import ChatMessage, KBInfo, Modality, Question


def _samples(text: str) -> list[StepSample]:
    msgs = [ChatMessage(role="user", content=text)]
    target = RouteTarget(query=text, retrievers=["text"])
    return [StepSample(step_type="ret", messages=msgs, target=target, trajectory_id="t")]


def test_resume_only_the_same_run_from_a_complete_checkpoint(tmp_path: Path) -> None:
    cfg = SFTConfig(model="some/model", output_dir=tmp_path / "run", save_steps=10)
    data = _samples("Who wrote Hamlet?")
    assert resume_checkpoint(cfg, data, False) is None  # nothing yet: a fresh run
    assert (tmp_path / "run" / RESUME_FILE).is_file()
    (tmp_path / "run" / "checkpoint-10").mkdir()
    (tmp_path / "run" / "checkpoint-10" / "trainer_state.json").write_text("{}")
    (tmp_path / "run" / "checkpoint-20").mkdir()  # killed while saving: no trainer state
    assert resume_checkpoint(cfg, data, False) == str(tmp_path / "run" / "checkpoint-10")

    with pytest.raises(ConfigError, match="another SFT run"):
        resume_checkpoint(cfg, _samples("Who wrote Faust?"), False)  # other data
    with pytest.raises(ConfigError, match="another SFT run"):
        resume_checkpoint(cfg.model_copy(update={"learning_rate": 1e-3}), data, False)
    with pytest.raises(ConfigError, match="another SFT run"):
        resume_checkpoint(cfg, data, True)  # teacher responses instead of targets
    (tmp_path / "run" / RESUME_FILE).write_text("{not json")  # a damaged marker: not this run
    with pytest.raises(ConfigError, match="another SFT run"):
        resume_checkpoint(cfg, data, False)
    # starting over on purpose records the new run, which then resumes
    other = _samples("Who wrote Faust?")
    assert resume_checkpoint(cfg, other, False, resume=False) is None
    assert resume_checkpoint(cfg, other, False) == str(tmp_path / "run" / "checkpoint-10")
    # a run that writes no checkpoints never resumes
    assert resume_checkpoint(cfg.model_copy(update={"save_steps": 0}), data, False) is None


def test_router_prompt_variant_is_recognised_from_the_messages() -> None:
    kbs = [KBInfo(name="text", description="Passages.", modality=Modality.TEXT)]
    q = Question(text="Who wrote Hamlet?")
    for variant in ("compact", "full"):
        builder = PromptBuilder(kbs, supports_images=False, router_prompt=variant)
        assert detect_router_prompt(builder.route_messages(q, [])) == variant
    assert detect_router_prompt([ChatMessage(role="user", content="hi")]) is None
    assert detect_router_prompt([ChatMessage(role="system", content="You route.")]) is None
    assert detect_router_prompt([]) is None
