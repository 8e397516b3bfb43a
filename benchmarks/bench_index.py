"""Index-build throughput: end-to-end text-KB build vs the raw encoder on the same texts.

Builds a text KB (no chunking, FAISS flat, packaged MiniLM) over the first ``--limit``
passages of mkqa-mini's ``corpus/text.jsonl`` and compares its passages/s with the encoder's
sentences/s on exactly the texts the build encodes (target: the build reaches >= 90% of the
raw encoder's rate). Also records peak memory, batched search throughput, and the machine
load (``uptime``) before and after, since the CPU may be shared.

    .venv/bin/python benchmarks/bench_index.py [--limit 9002] [--repeats 1]

Writes ``benchmarks/results/index.json`` and ``benchmarks/results/index.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("KBROUTER_SHARED_DATA", REPO.parent / "shared" / "data")) / "mkqa-mini"
RESULTS = REPO / "benchmarks" / "results"


class PeakRSS:
    """Samples this process's resident memory every 50 ms (psutil)."""

    def __init__(self) -> None:
        import psutil

        self._proc = psutil.Process()
        self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=9002, help="Passages to index (0: all).")
    ap.add_argument("--repeats", type=int, default=1, help="Alternating raw/build rounds.")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from kbrouter.config import parse_registry
    from kbrouter.encoders.text import load_text_encoder
    from kbrouter.kb.ingest import IngestReport, read_passages
    from kbrouter.kb.text import TextKB
    from kbrouter.types import Query

    load_before = uptime()
    passages = read_passages(DATA / "corpus" / "text.jsonl")
    if args.limit:
        passages = passages[: args.limit]
    work = Path(tempfile.mkdtemp(prefix="bench_index_"))
    src = work / "text.jsonl"
    with src.open("w", encoding="utf-8") as fh:
        for p in passages:
            fh.write(json.dumps({"id": p.id, "title": p.title, "text": p.text}) + "\n")
    cfg = parse_registry(
        {
            "index_dir": "index",
            "kb": [
                {
                    "name": "bench",
                    "description": "benchmark passages",
                    "modality": "text",
                    "source": {"path": str(src)},
                    "retrieval": {"mode": "hybrid", "batch_size": args.batch_size},
                }
            ],
        },
        base_dir=work,
    )
    kb_cfg = cfg.kb[0]
    encoder = load_text_encoder("minilm")
    items, _ = TextKB.read_items(kb_cfg, work, IngestReport())
    texts = [it.index_text for it in items]
    encoder.encode(texts[:128], batch_size=args.batch_size)  # warm-up

    raw_s: list[float] = []
    build_s: list[float] = []
    with PeakRSS() as mem:
        for r in range(args.repeats):
            t0 = time.perf_counter()
            encoder.encode(texts, batch_size=args.batch_size)
            raw_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            TextKB.build(kb_cfg, work / "index" / f"bench{r}", work, text_encoder=encoder)
            build_s.append(time.perf_counter() - t0)
        kb = TextKB.open(kb_cfg, work / "index" / "bench0", work, text_encoder=encoder)
        queries = [
            Query(text=p.title + " " + " ".join(p.text.split()[:12])) for p in passages[:200]
        ]
        t0 = time.perf_counter()
        kb.search(queries, k=10)
        search_s = time.perf_counter() - t0
    n = len(texts)
    raw_rate = n / min(raw_s)
    build_rate = n / min(build_s)
    result = {
        "passages": n,
        "batch_size": args.batch_size,
        "encoder": encoder.name,
        "raw_encoder_seconds": [round(s, 2) for s in raw_s],
        "build_seconds": [round(s, 2) for s in build_s],
        "raw_sentences_per_s": round(raw_rate, 1),
        "build_passages_per_s": round(build_rate, 1),
        "build_vs_raw": round(build_rate / raw_rate, 3),
        "target_build_vs_raw": 0.9,
        "hybrid_search_queries": len(queries),
        "hybrid_search_queries_per_s": round(len(queries) / search_s, 1),
        "peak_rss_mb": round(mem.peak / 2**20, 1),
        "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "uptime_before": load_before,
        "uptime_after": uptime(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "index.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    md = [
        "# Index build throughput (text KB, MiniLM, FAISS flat, + BM25)",
        "",
        "| passages | raw encoder (sent/s) | end-to-end build (passages/s) | build/raw | "
        "target | hybrid search (q/s, batch of 200) | peak RSS (MB) |",
        "|---|---|---|---|---|---|---|",
        f"| {n} | {raw_rate:.1f} | {build_rate:.1f} | {build_rate / raw_rate:.1%} | >= 90% | "
        f"{result['hybrid_search_queries_per_s']} | {result['peak_rss_mb']} |",
        "",
        f"Load before: `{load_before}`  ",
        f"Load after: `{result['uptime_after']}`  ",
        f"{os.cpu_count()} CPUs; the machine is shared, so absolute rates vary with its load; "
        "raw and build runs alternate so both see the same load. Best of "
        f"{args.repeats} round(s).",
        "",
    ]
    (RESULTS / "index.md").write_text("\n".join(md), encoding="utf-8")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
