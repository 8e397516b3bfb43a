"""Calibrate the relevance margin (kbrouter.reading.margin) on training questions, not on the
evaluation ones.

The questions are the mkqa-mini dev questions OUTSIDE the 60-question evaluation subset (seed
0, source-stratified; the split of ``bench_trained_router.py``), wtq capped as there. Their gold
paths (kbrouter.train.gold_paths) give, per retrieval hop, the sub-question and the gold KB; the
gold KB is searched with the sub-question as the engine would (hybrid, retrieve-k 10). For each
top-k and margin the benchmark counts, over the hops whose top-k holds a gold evidence item, the
share of those that the margin keeps, and the items shown per hop (image hops are left out:
they search with the question's image, where a pinned match stands alone).

Writes ``margin_calibration.json`` under ``--out``.

    .venv/bin/python benchmarks/bench_margin.py
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from pathlib import Path

from kbrouter.files import atomic_write_text

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
MARGINS = (0.1, 0.2, 0.25, 0.3, 0.4, 0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kbs", type=Path, default=HERE / "mkqa_kbs.toml")
    ap.add_argument("--limit", type=int, default=60, help="evaluation questions left out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--wtq-cap", type=int, default=1000)
    ap.add_argument("--top-k", default="2,3,5")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "answers")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from bench_trained_router import split_questions
    from kbrouter.eval.datasets import load_dataset
    from kbrouter.kb.registry import KBRegistry
    from kbrouter.reading.margin import within_margin
    from kbrouter.train.gold_paths import GoldPathBuilder, question_id
    from kbrouter.types import Query

    t0 = time.perf_counter()
    registry = KBRegistry.from_config(args.kbs)
    registry.build(progress=False)
    ds = load_dataset("mkqa-mini")
    _, train = split_questions(ds.examples, args.limit, args.seed, args.wtq_cap)
    gold = {e.id: set(e.gold_evidence or ()) for e in train}
    report = GoldPathBuilder(registry, top_k=2).build(train)
    modality = {kb.name: kb.modality.value for kb in registry.config.kb}
    hops: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
    for s in report.samples:
        if s.step_type != "ret" or not s.target.retrievers:
            continue
        kb = s.target.retrievers[0]
        if modality.get(kb) == "image":
            continue
        hops[kb].append((question_id(s.trajectory_id), s.target.query))

    ks = [int(k) for k in args.top_k.split(",")]
    depth = max(ks)
    rows = []
    for kb, items in sorted(hops.items()):
        found = registry.search(kb, [Query(text=q) for _, q in items], depth)
        for k in ks:
            for margin in (None, *MARGINS):
                with_gold = kept = shown = 0
                for (qid, _), evidence in zip(items, found, strict=True):
                    top = evidence[:k]
                    sel = top if margin is None else within_margin(top, margin)
                    shown += len(sel)

                    def hit(es, g=gold[qid]):
                        return any(e.id in g or e.metadata.get("doc_id") in g for e in es)

                    if hit(top):
                        with_gold += 1
                        kept += hit(sel)
                rows.append(
                    {
                        "kb": kb,
                        "modality": modality[kb],
                        "top_k": k,
                        "margin": margin,
                        "hops": len(items),
                        "hops_with_gold_in_top_k": with_gold,
                        "gold_kept_share": round(kept / with_gold, 4) if with_gold else None,
                        "shown_per_hop": round(shown / len(items), 3),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    registry.close()
    result = {
        "what": "relevance-margin calibration on gold-path hops of training questions",
        "questions": len(train),
        "held_out": {"limit": args.limit, "seed": args.seed, "stratified": True},
        "wtq_cap": args.wtq_cap,
        "retrieval": "each KB's configured search (hybrid), margin on the dense cosine",
        "rows": rows,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "margin_calibration.json", json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
