"""Evaluation datasets: typed examples, one loader per benchmark file, and a registry by name.

Every loader returns an :class:`EvalDataset` of :class:`EvalExample` objects with the gold list
the official evaluation uses (method.md sec. 4):

===================  ==========================================  ==================================
name                 file (under the shared data folder)         golds
===================  ==========================================  ==================================
``mkqa-mini``        ``mkqa-mini/questions/dev.jsonl``           ``answers`` (+ gold KBs, images)
``2wiki``            ``r1router/2wikimultihopqa_val.jsonl``      ``[answer]``
``infoseek``         ``r1router/infoseek_val.jsonl``             ``answer_eval``; numeric ranges
                                                                 expanded to a grid of numbers
``dynvqa``           ``r1router/DynVQA_en.202412.jsonl``         ``answer`` (Chinese + English,
                                                                 ints as strings)
``webqa``            ``r1router/webqa_val.jsonl``                ``answer`` (one quoted sentence)
``openwikitable``    ``r1router/openwikitqa_val.jsonl``          ``[answer]``
``tabfact``          ``r1router/tabfact_val.jsonl``              ``[answer]`` (``yes``/``no``)
``jsonl:<path>``     any JSONL file (see :func:`load_jsonl`)     ``answers``
===================  ==========================================  ==================================

Question images of InfoSeek, Dyn-VQA and WebQA are not shipped. Loading the questions works
without them; :meth:`EvalDataset.require_images` (called by the evaluation harness before any
method runs) fails with a :class:`~kbrouter.errors.DatasetError` saying what to download and to
pass ``--image-dir``.

The shared data folder is found as: the ``data_dir`` argument, else env ``KBROUTER_SHARED_DATA``,
else ``<repo>/../shared/data`` of a source checkout.
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from kbrouter.errors import DatasetError
from kbrouter.files import iter_jsonl
from kbrouter.types import KBInfo, Question, kb_key

logger = logging.getLogger(__name__)

__all__ = [
    "DATASET_NAMES",
    "EvalDataset",
    "EvalExample",
    "expand_numeric_range",
    "load_dataset",
    "load_jsonl",
    "load_mkqa_mini",
    "mkqa_evidence_titles",
    "select_examples",
    "shared_data_dir",
]

MKQA_KB_KINDS = ("text", "image", "table")
"""The gold-KB names used by mkqa-mini (one per modality)."""


class EvalExample(BaseModel):
    """One evaluation question with its gold answers (and gold KBs in hop order, if known)."""

    model_config = ConfigDict(extra="forbid")

    id: str
    question: Question
    golds: list[str] = Field(description="Gold answers; any one counts as correct.")
    gold_kbs: list[str] | None = Field(
        None, description="KB names needed, in hop order (configured names once mapped)."
    )
    gold_evidence: list[str] | None = Field(
        None,
        description="Ids of the gold evidence documents, one per hop (mkqa-mini "
        "``evidence``; JSONL ``gold_evidence``); used by error attribution and oracle-evidence.",
    )
    source: str = Field(description="Benchmark or sub-source the question comes from.")
    extra: dict[str, Any] = Field(default_factory=dict, description="Other fields of the record.")


class EvalDataset:
    """A named list of examples plus what the harness needs to know about them."""

    def __init__(
        self,
        name: str,
        examples: list[EvalExample],
        *,
        path: Path | None = None,
        answer_type: str = "open",
        image_hint: str | None = None,
        paper_compat: bool = False,
    ) -> None:
        self.name = name
        self.examples = examples
        self.path = path
        self.answer_type = answer_type
        """``open`` or ``yesno`` (yes/no accuracy is reported too)."""
        self.image_hint = image_hint
        """What to download when question images are missing (None: images are shipped)."""
        self.paper_compat = paper_compat

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[EvalExample]:
        return iter(self.examples)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": str(self.path) if self.path else None,
            "size": len(self.examples),
            "answer_type": self.answer_type,
            "paper_compat": self.paper_compat,
        }

    def missing_images(self, examples: Sequence[EvalExample] | None = None) -> list[Path]:
        """Question images referenced by ``examples`` (default: all) that do not exist."""
        exs = self.examples if examples is None else examples
        return [
            e.question.image
            for e in exs
            if e.question.image is not None and not e.question.image.is_file()
        ]

    def require_images(self, examples: Sequence[EvalExample] | None = None) -> None:
        """Raise :class:`DatasetError` if any question image of ``examples`` is missing."""
        missing = self.missing_images(examples)
        if not missing:
            return
        folder = missing[0].parent
        hint = self.image_hint or "the question images"
        raise DatasetError(
            f"{len(missing)} question image(s) of dataset {self.name!r} are missing, e.g. "
            f"{missing[0]} (looked in {folder}). Download {hint} and pass the folder holding "
            f"them with --image-dir DIR (files named as in the message above)."
        )

    def with_kb_names(self, kbs: Sequence[KBInfo] | dict[str, str]) -> EvalDataset:
        """Rewrite gold KB names to configured KB names, in place.

        ``kbs`` is either an explicit ``{gold name: kb_name}`` mapping or the registry's KB
        list. With a KB list, a gold name that is a configured name or alias (case and spaces
        ignored) becomes that KB's name; a kind ``text``/``image``/``table`` (mkqa-mini) becomes
        the only KB of that modality; anything else is kept (and logged once).
        """
        if isinstance(kbs, dict):
            mapping = dict(kbs)
        else:
            used = {k for e in self.examples for k in (e.gold_kbs or [])}
            mapping = kb_name_mapping(kbs, used)
        for ex in self.examples:
            if ex.gold_kbs:
                ex.gold_kbs = [mapping.get(k, k) for k in ex.gold_kbs]
        return self


def kb_name_mapping(kbs: Sequence[KBInfo], names: set[str] | Sequence[str]) -> dict[str, str]:
    """``{gold name: configured KB name}`` for the given gold names (see ``with_kb_names``)."""
    by_name = {kb_key(n): kb.name for kb in kbs for n in [kb.name, *kb.aliases]}
    mapping: dict[str, str] = {}
    for name in sorted(names):
        if kb_key(name) in by_name:
            mapping[name] = by_name[kb_key(name)]
            continue
        same_kind = [kb.name for kb in kbs if kb.modality.value == kb_key(name)]
        if len(same_kind) == 1:
            mapping[name] = same_kind[0]
        else:
            logger.warning(
                "gold KB %r matches no configured KB (by name, alias or unique modality); kept",
                name,
            )
    return mapping


# --------------------------------------------------------------------------- locating data


def shared_data_dir(data_dir: str | Path | None = None) -> Path:
    """The shared data folder.

    The argument, else env ``KBROUTER_SHARED_DATA``, else ``<repo>/../shared/data``.
    """
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get("KBROUTER_SHARED_DATA")
    if env:
        return Path(env).expanduser()
    return (Path(__file__).resolve().parents[3] / ".." / "shared" / "data").resolve()


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) pairs; blank lines skipped; a bad line raises DatasetError."""
    return iter_jsonl(path, what="dataset file", error=DatasetError)


def _field(rec: dict[str, Any], key: str, path: Path, lineno: int) -> Any:
    if key not in rec:
        raise DatasetError(f"{path}:{lineno}: missing field {key!r}")
    return rec[key]


def _is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _gold_strings(values: Sequence[Any], paper_compat: bool) -> list[str]:
    """``str()`` every gold (ints in Dyn-VQA). Default mode drops missing golds (None/NaN)."""
    return [str(v) for v in values if paper_compat or not _is_missing(v)]


# --------------------------------------------------------------------------- InfoSeek ranges


def _range_step(width: float) -> float:
    if width >= 50:
        return 1
    if width >= 5:
        return 0.1
    if width >= 1:
        return 0.01
    return 0.001


def _fmt_number(v: float) -> str:
    s = f"{round(v, 3):.3f}".rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


def expand_numeric_range(spec: dict[str, Any], paper_compat: bool = False) -> list[str]:
    """Expand an InfoSeek ``{"wikidata": x, "range": [lo, hi]}`` answer into candidate numbers.

    The grid step depends on the range width (>= 50: 1, >= 5: 0.1, >= 1: 0.01, else 0.001).

    * paper-compatible: exactly the released code, ``str(round(v, 3))`` for ``v`` in
      ``numpy.arange(lo, hi + step, step)`` (floats such as ``"1990.0"``; float error can add a
      point past ``hi``) plus the integers ``int(lo) .. int(hi)`` (which may lie below ``lo``).
    * default: the grid points ``lo + i * step`` within ``[lo, hi]``, formatted without trailing
      zeros (``"1990"``, ``"6.5"``), plus the integers inside ``[lo, hi]`` and the wikidata value.
    """
    lo, hi = (float(x) for x in spec["range"])
    step = _range_step(hi - lo)
    if paper_compat:
        import numpy as np

        out = [str(round(v, 3)) for v in np.arange(lo, hi + step, step)]
        out += [str(i) for i in range(int(lo), int(hi + 1))]
        return out
    n = int(math.floor((hi - lo) / step + 1e-9))
    values = [lo + i * step for i in range(n + 1)]
    values += list(range(math.ceil(lo), math.floor(hi) + 1))
    if spec.get("wikidata") is not None:
        values.append(float(spec["wikidata"]))
    return list(dict.fromkeys(_fmt_number(v) for v in values))


# --------------------------------------------------------------------------- loaders

_R1 = "r1router"

_IMAGE_HINTS = {
    "infoseek": "the OVEN images of InfoSeek (files oven_XXXXXXXX.jpg; see the R1-Router "
    "README and the InfoSeek/OVEN release)",
    "dynvqa": "the Dyn-VQA images (files <image_id>.jpg, 1.jpg ... 715.jpg; from the OmniSearch "
    "Dyn-VQA release, Alibaba-NLP)",
    "webqa": "the WebQA images (files <image_id>.jpg; WebQA release, decoded from its imgs.tsv)",
}


def _image_dir(name: str, root: Path, image_dir: str | Path | None) -> Path:
    if image_dir is not None:
        return Path(image_dir).expanduser()
    return root / _R1 / "images" / name


def _load_single_answer(
    path: Path,
    name: str,
    id_prefix: str,
    id_width: int,
    source: str,
    paper_compat: bool,
    answer_type: str | None = None,
) -> EvalDataset:
    """Text-only files whose records are ``{"question", "answer"}``: gold = ``[answer]``."""
    exs = []
    for i, (ln, rec) in enumerate(_iter_jsonl(path)):
        qid = f"{id_prefix}-{i:0{id_width}d}"
        exs.append(
            EvalExample(
                id=qid,
                question=Question(text=_field(rec, "question", path, ln), id=qid),
                golds=_gold_strings([_field(rec, "answer", path, ln)], paper_compat),
                source=source,
            )
        )
    extra = {"answer_type": answer_type} if answer_type else {}
    return EvalDataset(name, exs, path=path, paper_compat=paper_compat, **extra)


def load_2wiki(root: Path, paper_compat: bool = False, **_: Any) -> EvalDataset:
    """2WikiMultihopQA dev subset (3000); gold = ``[answer]``."""
    path = root / _R1 / "2wikimultihopqa_val.jsonl"
    return _load_single_answer(path, "2wiki", "2wiki", 5, "2wikimultihopqa", paper_compat)


def load_openwikitable(root: Path, paper_compat: bool = False, **_: Any) -> EvalDataset:
    """Open-WikiTable validation subset (3000); gold = ``[answer]`` (210 are ``"None"``)."""
    path = root / _R1 / "openwikitqa_val.jsonl"
    return _load_single_answer(path, "openwikitable", "owt", 5, "openwikitable", paper_compat)


def load_tabfact(root: Path, paper_compat: bool = False, **_: Any) -> EvalDataset:
    """TabFact statements as yes/no questions (1000); gold = ``[answer]``."""
    path = root / _R1 / "tabfact_val.jsonl"
    return _load_single_answer(
        path, "tabfact", "tabfact", 4, "tabfact", paper_compat, answer_type="yesno"
    )


def load_infoseek(
    root: Path, paper_compat: bool = False, image_dir: str | Path | None = None, **_: Any
) -> EvalDataset:
    """InfoSeek validation subset (1000, images from OVEN); gold = ``answer_eval``.

    Numeric answers (``[{"wikidata", "range"}]``) are expanded by :func:`expand_numeric_range`;
    paper mode expands only the first range, as released.
    """
    path = root / _R1 / "infoseek_val.jsonl"
    imgs = _image_dir("infoseek", root, image_dir)
    exs = []
    for ln, rec in _iter_jsonl(path):
        ans_eval = _field(rec, "answer_eval", path, ln)
        if not isinstance(ans_eval, list) or not ans_eval:
            raise DatasetError(f"{path}:{ln}: answer_eval must be a non-empty list")
        if isinstance(ans_eval[0], dict):
            specs = ans_eval[:1] if paper_compat else [a for a in ans_eval if isinstance(a, dict)]
            golds = [g for spec in specs for g in expand_numeric_range(spec, paper_compat)]
            if not paper_compat:
                golds = list(dict.fromkeys(golds))
        else:
            golds = _gold_strings(ans_eval, paper_compat)
        qid = str(_field(rec, "data_id", path, ln))
        image = imgs / f"{_field(rec, 'image_id', path, ln)}.jpg"
        exs.append(
            EvalExample(
                id=qid,
                question=Question(text=_field(rec, "question", path, ln), image=image, id=qid),
                golds=golds,
                source="infoseek",
                extra={
                    "answer": rec.get("answer"),
                    "numeric": isinstance(ans_eval[0], dict),
                    "image_id": rec["image_id"],
                },
            )
        )
    return EvalDataset(
        "infoseek", exs, path=path, image_hint=_IMAGE_HINTS["infoseek"], paper_compat=paper_compat
    )


def load_dynvqa(
    root: Path, paper_compat: bool = False, image_dir: str | Path | None = None, **_: Any
) -> EvalDataset:
    """Dyn-VQA English 2024-12 (715); gold = ``answer`` (Chinese and English variants)."""
    path = root / _R1 / "DynVQA_en.202412.jsonl"
    imgs = _image_dir("dynvqa", root, image_dir)
    exs = []
    for ln, rec in _iter_jsonl(path):
        qid = str(_field(rec, "question_id", path, ln))
        golden = rec.get("gloden_query")  # sic: the key is misspelled in the source
        exs.append(
            EvalExample(
                id=qid,
                question=Question(
                    text=_field(rec, "question", path, ln),
                    image=imgs / f"{_field(rec, 'image_id', path, ln)}.jpg",
                    id=qid,
                ),
                golds=_gold_strings(_field(rec, "answer", path, ln), paper_compat),
                source="dynvqa",
                extra={
                    "golden_query": None if _is_missing(golden) else golden,
                    "image_id": rec["image_id"],
                },
            )
        )
    return EvalDataset(
        "dynvqa", exs, path=path, image_hint=_IMAGE_HINTS["dynvqa"], paper_compat=paper_compat
    )


def _strip_quotes(s: str) -> str:
    s = s.strip()
    if len(s) >= 2 and s[0] == s[-1] == '"':
        return s[1:-1].strip()
    return s


def load_webqa(
    root: Path, paper_compat: bool = False, image_dir: str | Path | None = None, **_: Any
) -> EvalDataset:
    """WebQA image-based val subset (1000); gold = ``answer`` (one sentence).

    The source wraps each answer in literal double quotes. The metric ignores them either way
    (``"`` is punctuation); default mode strips them so exact match and reports read cleanly,
    paper mode keeps the strings byte-for-byte.
    """
    path = root / _R1 / "webqa_val.jsonl"
    imgs = _image_dir("webqa", root, image_dir)
    exs = []
    for i, (ln, rec) in enumerate(_iter_jsonl(path)):
        qid = f"webqa-{i:04d}"
        golds = _gold_strings(_field(rec, "answer", path, ln), paper_compat)
        if not paper_compat:
            golds = [_strip_quotes(g) for g in golds]
        exs.append(
            EvalExample(
                id=qid,
                question=Question(
                    text=_field(rec, "question", path, ln),
                    image=imgs / f"{_field(rec, 'image_id', path, ln)}.jpg",
                    id=qid,
                ),
                golds=golds,
                source="webqa",
                extra={"image_id": rec["image_id"]},
            )
        )
    return EvalDataset(
        "webqa", exs, path=path, image_hint=_IMAGE_HINTS["webqa"], paper_compat=paper_compat
    )


def load_mkqa_mini(
    root: Path,
    paper_compat: bool = False,
    image_dir: str | Path | None = None,
    split: str = "dev",
    kb_map: dict[str, str] | Sequence[KBInfo] | None = None,
    **_: Any,
) -> EvalDataset:
    """mkqa-mini questions (dev: 405) with gold answers, gold KBs in hop order and images.

    ``kb_map`` maps the kinds ``text``/``image``/``table`` to configured KB names (see
    :meth:`EvalDataset.with_kb_names`); without it the kinds are kept.
    """
    path = root / "mkqa-mini" / "questions" / f"{split}.jsonl"
    if not path.is_file() and split != "dev":
        raise DatasetError(f"mkqa-mini split {split!r} not found at {path} (only 'dev' is shipped)")
    exs = []
    for ln, rec in _iter_jsonl(path):
        qid = str(_field(rec, "id", path, ln))
        img = rec.get("image")
        if img:
            image = Path(image_dir) / Path(img).name if image_dir else path.parent / img
        else:
            image = None
        gold_kbs = rec.get("gold_kbs")
        if gold_kbs is not None and (
            not isinstance(gold_kbs, list) or any(k not in MKQA_KB_KINDS for k in gold_kbs)
        ):
            raise DatasetError(
                f"{path}:{ln}: gold_kbs must list text/image/table, got {gold_kbs!r}"
            )
        exs.append(
            EvalExample(
                id=qid,
                question=Question(text=_field(rec, "question", path, ln), image=image, id=qid),
                golds=_gold_strings(_field(rec, "answers", path, ln), paper_compat),
                gold_kbs=gold_kbs,
                gold_evidence=_evidence_ids(rec.get("evidence"), path, ln),
                source=str(rec.get("source", "mkqa-mini")),
                extra={k: rec[k] for k in ("hops", "synthetic", "evidence") if k in rec},
            )
        )
    ds = EvalDataset(
        "mkqa-mini",
        exs,
        path=path,
        image_hint="the mkqa-mini question images",
        paper_compat=paper_compat,
    )
    if kb_map is not None:
        ds.with_kb_names(kb_map)
    return ds


def _evidence_ids(value: Any, path: Path, ln: int) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str | int) for v in value):
        raise DatasetError(f"{path}:{ln}: gold evidence must be a list of ids, got {value!r}")
    return [str(v) for v in value]


def mkqa_evidence_titles(root: str | Path | None = None) -> dict[str, str]:
    """``{corpus id: title}`` of every mkqa-mini passage, image and table (gold evidence names)."""
    base = shared_data_dir(root) / "mkqa-mini" / "corpus"
    out: dict[str, str] = {}
    for name in ("text.jsonl", "images.jsonl", "tables.jsonl"):
        for _, rec in _iter_jsonl(base / name):
            if "id" in rec:
                out[str(rec["id"])] = str(rec.get("title") or rec["id"])
    return out


def load_jsonl(
    path: str | Path,
    paper_compat: bool = False,
    image_dir: str | Path | None = None,
    name: str | None = None,
) -> EvalDataset:
    """A generic JSONL dataset, one question per line.

    Fields: ``question`` (str, required), ``answers`` (list) or ``answer`` (str or list)
    (required), optional ``id`` (default ``<file stem>-<line>``), ``image`` (path relative to the
    JSONL file's folder, or to ``image_dir`` if given), ``gold_kbs`` (list of KB names in hop
    order), ``gold_evidence`` (ids of the gold evidence documents, one per hop) and ``source``
    (default: the file stem). Other fields go to ``extra``.
    """
    path = Path(path).expanduser()
    known = {"id", "question", "answers", "answer", "image", "gold_kbs", "gold_evidence", "source"}
    exs: list[EvalExample] = []
    seen: set[str] = set()
    for ln, rec in _iter_jsonl(path):
        q = _field(rec, "question", path, ln)
        if not isinstance(q, str) or not q.strip():
            raise DatasetError(f"{path}:{ln}: 'question' must be a non-empty string")
        if "answers" in rec:
            answers = rec["answers"]
        elif "answer" in rec:
            answers = rec["answer"]
        else:
            raise DatasetError(f"{path}:{ln}: missing field 'answers' (or 'answer')")
        if not isinstance(answers, list):
            answers = [answers]
        golds = _gold_strings(answers, paper_compat)
        if not golds:
            raise DatasetError(f"{path}:{ln}: no gold answer")
        qid = str(rec.get("id", f"{path.stem}-{ln}"))
        if qid in seen:
            raise DatasetError(f"{path}:{ln}: duplicate id {qid!r}")
        seen.add(qid)
        image = None
        if rec.get("image"):
            image = Path(image_dir) / rec["image"] if image_dir else path.parent / rec["image"]
        gold_kbs = rec.get("gold_kbs")
        if gold_kbs is not None and not (
            isinstance(gold_kbs, list) and all(isinstance(k, str) for k in gold_kbs)
        ):
            raise DatasetError(f"{path}:{ln}: gold_kbs must be a list of KB names")
        exs.append(
            EvalExample(
                id=qid,
                question=Question(text=q, image=image, id=qid),
                golds=golds,
                gold_kbs=gold_kbs,
                gold_evidence=_evidence_ids(rec.get("gold_evidence"), path, ln),
                source=str(rec.get("source", path.stem)),
                extra={k: v for k, v in rec.items() if k not in known},
            )
        )
    if not exs:
        raise DatasetError(f"dataset file {path} has no questions")
    yesno = all(g.strip().lower() in ("yes", "no") for e in exs for g in e.golds)
    return EvalDataset(
        name or path.stem,
        exs,
        path=path,
        answer_type="yesno" if yesno else "open",
        paper_compat=paper_compat,
    )


_LOADERS: dict[str, Callable[..., EvalDataset]] = {
    "mkqa-mini": load_mkqa_mini,
    "2wiki": load_2wiki,
    "infoseek": load_infoseek,
    "dynvqa": load_dynvqa,
    "webqa": load_webqa,
    "openwikitable": load_openwikitable,
    "tabfact": load_tabfact,
}

DATASET_NAMES = (*_LOADERS, "jsonl:<path>")
"""Names accepted by :func:`load_dataset`."""


def load_dataset(
    name: str,
    *,
    data_dir: str | Path | None = None,
    image_dir: str | Path | None = None,
    paper_compat: bool = False,
    **kwargs: Any,
) -> EvalDataset:
    """Load a dataset by registry name (see :data:`DATASET_NAMES`)."""
    if name.startswith("jsonl:"):
        return load_jsonl(name[len("jsonl:") :], paper_compat=paper_compat, image_dir=image_dir)
    loader = _LOADERS.get(name.lower())
    if loader is None:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(DATASET_NAMES)}")
    root = shared_data_dir(data_dir)
    if not root.is_dir():
        raise DatasetError(
            f"shared data folder not found: {root} (pass --data-dir or set KBROUTER_SHARED_DATA)"
        )
    return loader(root, paper_compat=paper_compat, image_dir=image_dir, **kwargs)


def select_examples(
    examples: Sequence[EvalExample],
    limit: int | None = None,
    seed: int = 0,
    stratify: bool = False,
) -> list[EvalExample]:
    """A reproducible subset.

    Without ``stratify``: the first ``limit`` examples in file order (``limit=None``: all).
    With ``stratify``: a seeded sample of ``limit`` examples allocated to sources in proportion
    to their size (largest remainder, at least one per source while ``limit`` allows), returned
    in file order.
    """
    exs = list(examples)
    if limit is None or limit >= len(exs):
        return exs
    if limit <= 0:
        return []
    if not stratify:
        return exs[:limit]
    rng = random.Random(seed)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, e in enumerate(exs):
        groups[e.source].append(i)
    sources = sorted(groups)
    alloc = dict.fromkeys(sources, 0)
    if limit >= len(sources):
        alloc = dict.fromkeys(sources, 1)
    remaining = limit - sum(alloc.values())
    total = len(exs)
    quotas = {s: len(groups[s]) * limit / total for s in sources}
    extra = {s: max(0.0, quotas[s] - alloc[s]) for s in sources}
    for s in sources:
        add = min(int(extra[s]), len(groups[s]) - alloc[s], remaining)
        alloc[s] += add
        remaining -= add
    order = sorted(sources, key=lambda s: (-(extra[s] - int(extra[s])), rng.random()))
    while remaining > 0:
        progressed = False
        for s in order:
            if remaining and alloc[s] < len(groups[s]):
                alloc[s] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            break
    chosen: list[int] = []
    for s in sources:
        idx = list(groups[s])
        rng.shuffle(idx)
        chosen.extend(idx[: alloc[s]])
    return [exs[i] for i in sorted(chosen)]
