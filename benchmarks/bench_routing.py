"""Routing-only benchmark: learned router vs prompted LLM routers vs random vs nearest-example.

Data: every gold-path state of the 405 mkqa-mini dev questions (hop i labelled gold_kbs[i], the
state after the last hop ``none``), and the 346 router steps of the released Step-GRPO
validation file (teacher's KB or ``none``). KBs: ``benchmarks/mkqa_kbs.toml`` (text/table/image).

Routers:
- ``learned``: 5-fold grouped cross-validation (each fold's router fitted with its own
  thresholds on the other folds' questions), default RouterConfig;
- ``nearest``: a nearest-example router in the style of semantic-router (each state routed to
  the label of its most similar training state by MiniLM cosine, same folds). The real
  ``semantic-router`` package is tried first; see ``routing.md`` for whether it ran;
- ``random``: uniform over KBs + none, seeded;
- ``r1-router <model>``: the prompted LLM router, route calls only, teacher-forced, on a seeded
  stratified subset (``--llm-limit`` questions; the run is resumable: decisions are appended to
  ``--runs``/<name>.jsonl as they come).

Latency: one learned-router decision (embedding included), single and batched 64, vs the mean
LLM route call. Writes ``routing.json`` under ``--out`` (the README there has the table).
Prompted-LLM rows already in ``routing.json`` for models not named in ``--llm-models`` are kept
(each records its own subset size), so a slow model can be measured on a smaller stated subset
in a later run: ``--llm-models llama-cpp:qwen2.5-coder-1.5b --llm-limit 30``.

    .venv/bin/python benchmarks/bench_routing.py [--llm-models llama-cpp,llama-cpp:quality]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _subset(samples, ids):
    return [s for s in samples if s.group in ids]


def _nearest(samples, kb_names, folds, encoder):
    """1-nearest-neighbour by cosine of the question (+ step and history key), same folds."""
    import numpy as np

    from kbrouter.routing.router import _group_splits
    from kbrouter.types import RouteDistribution

    labels = [*kb_names, "none"]
    texts = [
        f"{s.state.question} [step {s.state.step}; after {' '.join(s.state.prev_kbs) or '-'}]"
        for s in samples
    ]
    vecs = encoder.encode(texts)
    y = [s.label for s in samples]
    out = [None] * len(samples)
    for tr, te in _group_splits(y, [s.group for s in samples], folds, 0):
        sims = vecs[te] @ vecs[tr].T
        for row, i in zip(sims, te, strict=True):
            j = tr[int(np.argmax(row))]
            out[i] = RouteDistribution(
                probs={lab: 1.0 if lab == y[j] else 0.0 for lab in labels},
                label=y[j],
                confidence=1.0,
            )
    return out


def _semantic_router_status() -> str:
    try:
        import semantic_router  # noqa: F401

        return "installed"
    except ImportError as e:
        return f"not importable here ({e})"


def _llm(model_spec, infos, samples, runs: Path, seed: int):
    from kbrouter.eval.routing_eval import predict_llm_router, sample_key
    from kbrouter.models.registry import load_model
    from kbrouter.types import RouteDistribution

    runs.mkdir(parents=True, exist_ok=True)
    path = runs / f"llm-{model_spec.replace(':', '_')}.jsonl"
    done_keys = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
                done_keys[rec["key"]] = rec
            except ValueError:
                continue
    keys = [sample_key(s) for s in samples]
    done = {
        i: RouteDistribution.model_validate(done_keys[k]["decision"])
        for i, k in enumerate(keys)
        if k in done_keys
    }
    secs_old = [done_keys[k]["seconds"] for k in keys if k in done_keys]
    model = load_model(model_spec)
    f = path.open("a")

    def on_done(i, d, sec):
        f.write(json.dumps({"key": keys[i], "decision": d.model_dump(), "seconds": sec}) + "\n")
        f.flush()
        print(f"  {model_spec}: {i + 1}/{len(samples)} {d.label} ({sec:.1f}s)", flush=True)

    try:
        decisions, secs = asyncio.run(
            predict_llm_router(model, infos, samples, seed=seed, on_done=on_done, done=done)
        )
    finally:
        f.close()
        close = getattr(model, "close", None)
        if close:
            close()
    info = {**model.describe(), "router_prompt": model.prompt_variant or "full"}
    return decisions, secs_old + secs, info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--kbs", type=Path, default=HERE / "mkqa_kbs.toml")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "routing")
    ap.add_argument("--runs", type=Path, default=REPO / "runs" / "bench-routing")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--llm-models", default="llama-cpp", help="comma-separated model specs")
    ap.add_argument("--llm-limit", type=int, default=60, help="mkqa-mini questions for LLMs")
    ap.add_argument("--llm-steps-limit", type=int, default=60, help="released router steps")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from kbrouter.encoders.text import load_text_encoder
    from kbrouter.eval import routing_eval as rv
    from kbrouter.eval.datasets import load_dataset, mkqa_evidence_titles, select_examples
    from kbrouter.kb.registry import KBRegistry
    from kbrouter.routing.data import LabelResolver
    from kbrouter.routing.router import LearnedRouter, RouterConfig, fit_router
    from kbrouter.train.router import step_route_samples
    from kbrouter.train.steps import read_steps
    from kbrouter.types import RouteState

    infos = KBRegistry.from_config(args.kbs).infos
    kb_names = [i.name for i in infos]
    labels = [*kb_names, "none"]
    ds = load_dataset("mkqa-mini")
    ds.with_kb_names(infos)
    titles = mkqa_evidence_titles()
    data = {
        "mkqa-mini dev": rv.dataset_samples(ds.examples, infos, titles),
        "released steps": [
            s
            for s in step_route_samples(
                read_steps(REPO.parent / "shared/data/r1router/grpo_dataset_valid_new.jsonl"),
                LabelResolver(infos),
            )
            if s.state.sub_question is None
        ],
    }
    llm_ids = {
        "mkqa-mini dev": {
            e.id for e in select_examples(ds.examples, args.llm_limit, args.seed, stratify=True)
        },
    }
    steps_groups = sorted({s.group for s in data["released steps"]})
    import random

    rng = random.Random(args.seed)
    rng.shuffle(steps_groups)
    kept, n = set(), 0
    for g in steps_groups:
        if n >= args.llm_steps_limit:
            break
        kept.add(g)
        n += sum(1 for s in data["released steps"] if s.group == g)
    llm_ids["released steps"] = kept

    enc = rv._MemoEncoder(load_text_encoder("minilm"))
    specs = [m.strip() for m in args.llm_models.split(",") if m.strip()]
    kept_llm = _earlier_llm_rows(args.out / "routing.json", specs)
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "router_config": RouterConfig().model_dump(),
        "semantic_router": _semantic_router_status(),
        "data": {},
        "routers": {},
    }
    result["routers"].update(kept_llm)
    keys = (
        "hop1_accuracy",
        "accuracy",
        "abstain_precision",
        "abstain_recall",
        "ece",
        "n",
        "questions",
    )
    for dname, samples in data.items():
        result["data"][dname] = {
            "states": len(samples),
            "questions": len({s.group for s in samples}),
        }
        rows = {}
        t0 = time.perf_counter()
        dec, _ = rv.predict_cross_validated(
            samples, kb_names, RouterConfig(), folds=args.folds, encoder=enc
        )
        rows["learned (logreg, 5-fold CV)"] = (dec, samples, time.perf_counter() - t0)
        _LEARNED_CACHE[dname] = dec
        rows["nearest-example (1-NN, 5-fold CV)"] = (
            _nearest(samples, kb_names, args.folds, enc),
            samples,
            None,
        )
        rows["random"] = (rv.predict_random(samples, labels, args.seed), samples, None)
        try:
            import sys

            sys.path.insert(0, str(HERE))
            from peer_semantic_router import semantic_router_decisions

            dec, facts = semantic_router_decisions(samples, kb_names, args.folds, enc)
            rows[PEER] = (dec, samples, None)
            result.setdefault("semantic_router_facts", {})[dname] = facts
        except Exception as e:  # the peer is optional: say why it did not run
            result["semantic_router"] = f"did not run: {type(e).__name__}: {e}"
            earlier = _earlier_row(args.out / "routing.json", PEER, dname)
            if earlier is not None:  # keep its last measurement, marked as such
                result["routers"].setdefault(PEER, {})[dname] = earlier
        for name, (dec, ss, _sec) in rows.items():
            sub = args.out / dname.replace(" ", "-") / name.split(" ")[0]
            summ = rv.write_routing_report(sub, ss, dec, labels, router=name)
            (sub / "predictions.jsonl").unlink()  # every decision: large
            if not name.startswith("learned"):  # the peers' error lists are most of the states
                (sub / "misrouted.jsonl").unlink()
            result["routers"].setdefault(name, {})[dname] = {k: summ.get(k) for k in keys}
            print(dname, name, {k: summ.get(k) for k in keys}, flush=True)
        _write(args.out, result)

    # latency of the learned router (fitted on all mkqa-mini states) vs an LLM route call
    router = fit_router(
        data["mkqa-mini dev"], kb_names, RouterConfig(), encoder=load_text_encoder("minilm")
    )
    router.save(args.runs / "router-mkqa-all")
    router = LearnedRouter.load(args.runs / "router-mkqa-all")  # a fresh encoder: no memo
    qs = [e.question for e in ds.examples]
    states = [
        RouteState(question=q.text + f" #{i}", has_image=q.image is not None)
        for i, q in enumerate(qs)
    ]
    router.predict(states[:8])  # warm-up
    single = []
    for s in states[:100]:
        t = time.perf_counter()
        router.predict([s])
        single.append(1000 * (time.perf_counter() - t))
    batched = []
    for i in range(0, 320, 64):
        t = time.perf_counter()
        router.predict(states[i : i + 64])
        batched.append(1000 * (time.perf_counter() - t) / 64)
    result["latency_ms_single"] = statistics.median(single)
    result["latency_ms_batched"] = statistics.median(batched)
    result["latency_encode_batch_size"] = router.featurizer.encode_batch_size
    # the same 64-state batches with other encoder batch sizes (the default pads less)
    by_bs = {}
    for bs in (8, 16, 32, 64):
        router.featurizer.encode_batch_size = bs
        per = []
        for rep in range(3):
            for i in range(0, 320, 64):
                batch = [
                    s.model_copy(update={"question": s.question + f" r{rep}b{bs}"})
                    for s in states[i : i + 64]
                ]
                t = time.perf_counter()
                router.predict(batch)
                per.append(1000 * (time.perf_counter() - t) / 64)
        by_bs[bs] = statistics.median(per)
    router.featurizer.encode_batch_size = result["latency_encode_batch_size"]
    result["latency_ms_batched_by_encode_batch_size"] = by_bs
    print("latency", result["latency_ms_single"], result["latency_ms_batched"], flush=True)
    _write(args.out, result)

    for spec in specs:
        for dname, samples in data.items():
            ss = [s for s in samples if s.group in llm_ids[dname]]
            if not ss:  # e.g. --llm-steps-limit 0
                continue
            dec, secs, info = _llm(spec, infos, ss, args.runs / dname.replace(" ", "-"), args.seed)
            name = f"r1-router {spec} (teacher-forced)"
            sub = args.out / dname.replace(" ", "-") / f"llm-{spec.replace(':', '_')}"
            summ = rv.write_routing_report(sub, ss, dec, labels, router=name)
            (sub / "predictions.jsonl").unlink()
            row = {k: summ.get(k) for k in keys}
            row["route_seconds_mean"] = statistics.mean(secs) if secs else None
            row["subset"] = {
                "questions": len({s.group for s in ss}),
                "states": len(ss),
                "seed": args.seed,
                "stratified": dname == "mkqa-mini dev",
                "model": info,
            }
            result["routers"].setdefault(name, {})[dname] = row
            # the learned router on the same subset, for a like-for-like comparison
            lrn = rv.score_routing(
                ss,
                [
                    d
                    for d, s in zip(
                        rows_learned(result, dname, args, samples, kb_names, enc),
                        samples,
                        strict=True,
                    )
                    if s.group in llm_ids[dname]
                ],
                labels,
            )
            result["routers"][name][dname]["learned_on_same_subset"] = {k: lrn.get(k) for k in keys}
            print(dname, name, row, flush=True)
            _write(args.out, result)
    result["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    _write(args.out, result)


_LEARNED_CACHE: dict = {}
PEER = "semantic-router (real package, 5-fold CV)"


def _earlier_row(path: Path, router: str, dname: str) -> dict | None:
    """``router``'s row for ``dname`` in an earlier ``routing.json``, noted as earlier."""
    if not path.is_file():
        return None
    doc = json.loads(path.read_text())
    row = doc.get("routers", {}).get(router, {}).get(dname)
    if row is None:
        return None
    note = row.get("note") or f"measured in an earlier run (started {doc.get('started_at')})"
    return {**row, "note": note}


DEFAULT_LLM = "llama-cpp"


def _earlier_llm_rows(path: Path, specs: list[str]) -> dict:
    """Prompted-LLM rows of an earlier ``routing.json`` for models not re-run now."""
    if not path.is_file():
        return {}
    routers = json.loads(path.read_text()).get("routers", {})
    again = {f"r1-router {s} (teacher-forced)" for s in specs}
    return {n: r for n, r in routers.items() if n.startswith("r1-router ") and n not in again}


def rows_learned(result, dname, args, samples, kb_names, enc):
    """The cross-validated learned decisions of ``dname`` (recomputed once, memoised)."""
    from kbrouter.eval import routing_eval as rv
    from kbrouter.routing.router import RouterConfig

    if dname not in _LEARNED_CACHE:
        _LEARNED_CACHE[dname], _ = rv.predict_cross_validated(
            samples, kb_names, RouterConfig(), folds=args.folds, encoder=enc
        )
    return _LEARNED_CACHE[dname]


def _write(out: Path, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    routers = result["routers"]
    flat = {}
    for name, per in routers.items():
        mk = per.get("mkqa-mini dev", {})
        flat[name] = {
            k: mk.get(k) for k in ("hop1_accuracy", "accuracy", "abstain_recall", "ece", "n")
        }
        flat[name]["released_steps"] = per.get("released steps")
    doc = {**result, "summary": flat}
    doc["latency_ms_batched"] = result.get("latency_ms_batched")
    # one route call of the embedded default (the 0.5B), whichever run measured it
    default = routers.get(f"r1-router {DEFAULT_LLM} (teacher-forced)", {})
    secs = default.get("mkqa-mini dev", {}).get("route_seconds_mean")
    doc["llm_route_ms"] = 1000 * secs if secs else None
    tmp = out / ".routing.json.tmp"
    tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    os.replace(tmp, out / "routing.json")


if __name__ == "__main__":
    main()
