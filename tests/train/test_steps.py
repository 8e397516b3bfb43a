"""Step samples: the released R1-Router file loads with the documented counts; our format and
the paper format round-trip; the split is deterministic, leak-free and stratified."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from kbrouter.errors import DataError
from kbrouter.train.steps import (
    RouteTarget,
    StepSample,
    read_paper_steps,
    read_steps,
    split_steps,
    write_paper_steps,
    write_steps,
)
from kbrouter.types import ChatMessage, ImagePart


@pytest.fixture(scope="module")
def released(r1router_dir: Path) -> list[StepSample]:
    return read_paper_steps(r1router_dir / "grpo_dataset_valid_new.jsonl")


def test_released_file_counts(released: list[StepSample]) -> None:
    """119 trajectories, 758 steps: 346 ret (text 173, table 85, none 53, text-image 35),
    293 intermediate ans, 119 final ans (method.md sec. 5)."""
    assert len({s.trajectory_id for s in released}) == 119
    assert len(released) == 758
    assert Counter(s.kind for s in released) == {"ret": 346, "sub_answer": 293, "final": 119}
    kbs = Counter(
        (s.target.retrievers[0] if s.target.retrievers else "none")
        for s in released
        if isinstance(s.target, RouteTarget)
    )
    assert kbs == {
        "text retriever": 173,
        "table retriever": 85,
        "none": 53,
        "text image retriever": 35,
    }
    stops = [s for s in released if isinstance(s.target, RouteTarget) and s.target.is_stop]
    assert len(stops) == 53


def test_released_file_structure(released: list[StepSample]) -> None:
    """Final steps target gold lists, image steps carry an image part, sources are inferred."""
    finals = [s for s in released if s.final]
    assert all(isinstance(s.target, list) and s.target for s in finals)
    assert all(isinstance(s.target, str) for s in released if s.kind == "sub_answer")
    with_image = [s for s in released if s.images]
    assert with_image and all(s.source == "infoseek" for s in with_image)
    assert all("<image>" in s.problem for s in with_image)
    assert {s.source for s in released} == {"2wikimultihopqa", "openwikitable", "infoseek"}
    first = released[0]
    assert first.messages[0].role == "system" and first.problem.startswith("Origin question:")


def test_paper_format_round_trip_is_exact(r1router_dir: Path, tmp_path: Path, released) -> None:
    """Writing the loaded released file back in the paper format reproduces every record."""
    out = write_paper_steps(released, tmp_path / "paper.jsonl")
    original = (r1router_dir / "grpo_dataset_valid_new.jsonl").read_text().splitlines()
    again = out.read_text().splitlines()
    assert [json.loads(x) for x in again] == [json.loads(x) for x in original]


def test_our_format_round_trip(tmp_path: Path, released) -> None:
    """Our JSONL keeps every field (including image parts) and read_steps detects it."""
    path = write_steps(released[:40], tmp_path / "steps.jsonl")
    assert read_steps(path) == released[:40]


def test_read_steps_detects_paper_format(r1router_dir: Path) -> None:
    assert len(read_steps(r1router_dir / "grpo_dataset_valid_new.jsonl")) == 758


def test_bad_records_name_file_and_line(tmp_path: Path) -> None:
    """A malformed line raises DataError with file:line; a missing file is a DataError."""
    bad = tmp_path / "bad.jsonl"
    good = {
        "images": [],
        "steps": [
            {
                "step_type": "ret",
                "system": "s",
                "problem": "p",
                "answer": {"query": "q", "retriever": ["text retriever"]},
            }
        ],
    }
    bad.write_text(
        json.dumps(good) + "\n" + json.dumps({"images": [], "steps": [{"step_type": "x"}]}) + "\n"
    )
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        read_steps(bad)
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    with pytest.raises(DataError, match=r"broken\.jsonl:1: invalid JSON"):
        read_steps(broken)
    with pytest.raises(DataError, match="not found"):
        read_steps(tmp_path / "missing.jsonl")


def test_step_sample_validates_target_type() -> None:
    """A router step needs a RouteTarget; a final answer step needs a gold list."""
    msgs = [ChatMessage(role="user", content="q")]
    with pytest.raises(ValueError, match="RouteTarget"):
        StepSample(step_type="ret", messages=msgs, target="x", trajectory_id="t")
    with pytest.raises(ValueError, match="gold list"):
        StepSample(step_type="ans", final=True, messages=msgs, target="x", trajectory_id="t")


def test_image_placeholder_becomes_image_part() -> None:
    """`<image>` in a paper problem becomes an ImagePart of the record's image path."""
    from kbrouter.train.steps import paper_record_to_samples

    rec = {
        "images": ["/x/oven_1.jpg"],
        "steps": [
            {
                "step_type": "ans",
                "system": "s",
                "problem": "Origin question: what?\n<image>",
                "answer": ["a"],
            }
        ],
    }
    (s,) = paper_record_to_samples(rec, "t")
    parts = s.messages[1].content
    assert isinstance(parts, list) and isinstance(parts[1], ImagePart)
    assert s.images == [Path("/x/oven_1.jpg")] and s.problem.endswith("<image>")


def test_split_is_deterministic_stratified_and_by_trajectory(released) -> None:
    train, val = split_steps(released, val_fraction=0.2, seed=3)
    train2, val2 = split_steps(released, val_fraction=0.2, seed=3)
    assert (train, val) == (train2, val2)
    assert len(train) + len(val) == len(released)
    assert not {s.trajectory_id for s in train} & {s.trajectory_id for s in val}
    by_source = Counter(s.source for s in released if s.final)
    val_by_source = Counter(s.source for s in val if s.final)
    for source, n in by_source.items():
        assert val_by_source[source] == round(0.2 * n)
    _, other = split_steps(released, val_fraction=0.2, seed=4)
    assert {s.trajectory_id for s in other} != {s.trajectory_id for s in val}
