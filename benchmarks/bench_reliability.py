"""Fault injection: does bad input get a clear error, and is nothing lost?

Cases (each passes or fails, with what a user sees):

- parser fuzz: generated router outputs through ``parse_route`` / ``parse_answer``: every one
  parses or raises ``ModelOutputError`` (anything else is a crash);
- corrupted indexes (the demo KBs, dense + BM25): a truncated FAISS file, an edited manifest, a
  removed BM25 folder, truncated items: a clear error naming the KB and the fix, never results;
- ``kill -9`` during ``kbrouter index --force`` at several points: the previous index stays
  usable with identical results, and the next build completes with identical results;
- ``kill -9`` during ``kbrouter eval``: re-running resumes, and the final results equal an
  uninterrupted run's (same seed, greedy), with no duplicated or lost rows;
- a model server that hangs, returns garbage, returns 500s, or dies mid-run;
- bad inputs to the CLI: each gives exit code 2 and a one-paragraph error, no traceback.

Writes ``reliability.json`` (``cases``, ``passed``, per-case results) and ``reliability.md``.
The model server is the fake OpenAI-compatible one of the tests (no model is run).

    .venv/bin/python benchmarks/bench_reliability.py
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEMO = REPO / "demo"
KBROUTER = [sys.executable, "-m", "kbrouter.cli.main"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}


class Case:
    def __init__(self, name: str, category: str) -> None:
        self.name, self.category = name, category
        self.passed = False
        self.detail = ""
        self.seen = ""  # what a user sees (the error text)
        self.seconds = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "category": self.category,
            "passed": self.passed,
            "detail": self.detail,
            "user_sees": self.seen,
            "seconds": round(self.seconds, 2),
        }


def run_case(cases: list[Case], name: str, category: str, fn: Callable[[Case], None]) -> None:
    case = Case(name, category)
    t0 = time.perf_counter()
    try:
        fn(case)
    except Exception as e:  # noqa: BLE001 - a crashing check is a failed case, recorded
        case.passed = False
        case.detail = f"check crashed: {type(e).__name__}: {e}"
    case.seconds = time.perf_counter() - t0
    cases.append(case)
    print(f"[{'pass' if case.passed else 'FAIL'}] {category}: {name} - {case.detail}", flush=True)


# --------------------------------------------------------------------------- helpers


def _demo_config(folder: Path) -> Path:
    """A copy of the demo kbs.toml reading the repo's demo data, indexing into ``folder``."""
    import tomllib

    data = tomllib.loads((DEMO / "kbs.toml").read_text(encoding="utf-8"))
    lines = [f'index_dir = "{(folder / "index").as_posix()}"', ""]
    for kb in data["kb"]:
        lines.append("[[kb]]")
        for key, value in kb.items():
            if key == "source":
                value = {k: str((DEMO / v).resolve()) for k, v in value.items()}
            lines.append(f"{key} = {_toml(value)}")
        lines.append("")
    path = folder / "kbs.toml"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _toml(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(str(value))


QUERIES = ["capital of Australia", "tallest building", "Which planet is largest?"]


def _search_all(config: Path) -> dict[str, list[list[str]]]:
    from kbrouter.kb.registry import KBRegistry

    reg = KBRegistry.from_config(config)
    try:
        return {n: [[e.id for e in r] for r in reg.search(n, QUERIES, k=3)] for n in reg.names}
    finally:
        reg.close()


def _build(config: Path, force: bool = True) -> subprocess.CompletedProcess:
    args = [*KBROUTER, "index", "--config", str(config)] + (["--force"] if force else [])
    return subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=900)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeServer:
    """tests/models/chat_server.py in a subprocess (so it can be killed)."""

    def __init__(self, latency: float = 0.0) -> None:
        self.port = _free_port()
        self.latency = latency
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> FakeServer:
        script = REPO / "tests" / "models" / "chat_server.py"
        self.proc = subprocess.Popen(
            [sys.executable, str(script), "--port", str(self.port), "--latency", str(self.latency)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                if time.time() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("fake chat server did not start") from None
                time.sleep(0.1)

    def control(self, **cmd: Any) -> None:
        import httpx

        httpx.post(f"http://127.0.0.1:{self.port}/control", json=cmd, timeout=5)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# --------------------------------------------------------------------------- parser fuzz

_FRAGMENTS = [
    "<think>",
    "</think>",
    "<sub-question>",
    "</sub-question>",
    "<ret>",
    "</ret>",
    "<answer>",
    "</answer>",
    "None",
    "none",
    "text",
    "tables",
    "images",
    "Text Retriever",
    "Table Retriever, Text Image Retriever",
    "What is the capital of Australia?",
    "\n",
    " ",
    "<",
    ">",
    "/",
    "<<ret>>",
    "</ret></ret>",
    "\x00",
    "🙂",
    "ñ",
    "\u202e",
    "{",
    '"',
    "\\",
    "```",
    "<sub-question></sub-question>",
]


def _fuzz_texts(n: int, seed: int = 0):
    rng = random.Random(seed)
    for _ in range(n):
        k = rng.randint(0, 14)
        parts = [rng.choice(_FRAGMENTS) for _ in range(k)]
        if rng.random() < 0.3:
            parts.insert(
                rng.randint(0, len(parts)),
                "".join(chr(rng.randint(1, 0x2FFF)) for _ in range(rng.randint(1, 40))),
            )
        if rng.random() < 0.02:
            parts.append("x" * rng.randint(1000, 20000))
        text = "".join(parts)
        if rng.random() < 0.2 and text:  # truncated mid-output
            text = text[: rng.randint(0, len(text))]
        yield text


def case_parser_fuzz(case: Case, n: int) -> None:
    from kbrouter.errors import ModelOutputError, UnknownKBError
    from kbrouter.policies.parser import parse_answer, parse_route

    names = {"text": "text", "tables": "tables", "images": "images", "textretriever": "text"}

    def resolve(name: str) -> str:
        key = "".join(name.split()).lower()
        if key not in names:
            raise UnknownKBError(name, list(names))
        return names[key]

    crashes: list[str] = []
    parsed = rejected = 0
    t0 = time.perf_counter()
    for text in _fuzz_texts(n):
        try:
            parse_route(text, resolve)
            parsed += 1
        except ModelOutputError:
            rejected += 1
        except Exception as e:  # noqa: BLE001 - that is what we count
            crashes.append(f"{type(e).__name__}: {e} on {text[:60]!r}")
        try:
            parse_answer(text)
        except Exception as e:  # noqa: BLE001
            crashes.append(f"parse_answer {type(e).__name__}: {e} on {text[:60]!r}")
    seconds = time.perf_counter() - t0
    case.passed = not crashes
    case.detail = (
        f"{n} outputs in {seconds:.1f} s: {parsed} parsed, {rejected} rejected with "
        f"ModelOutputError, {len(crashes)} crashes"
    )
    case.seen = crashes[0] if crashes else "ModelOutputError naming the missing or bad tag"


# --------------------------------------------------------------------------- indexes


def _expect_index_error(case: Case, config: Path, kb: str) -> None:
    from kbrouter.errors import KBRouterError

    try:
        got = _search_all(config)
    except KBRouterError as e:
        text = str(e)
        case.seen = text
        names_kb = f"/{kb}/" in text or f"KB {kb!r}" in text
        case.passed = names_kb and "kbrouter index" in text
        case.detail = "clear error" if case.passed else "error does not name the KB or the fix"
        return
    case.passed = False
    case.detail = f"returned results instead of an error: {str(got)[:120]}"


def index_cases(cases: list[Case], work: Path) -> None:
    base = work / "idx"
    base.mkdir()
    config = _demo_config(base)
    res = _build(config)
    if res.returncode != 0:
        raise RuntimeError(f"demo index build failed: {res.stderr[-500:]}")
    reference = _search_all(config)

    def corrupt(name: str, kb: str, damage: Callable[[Path], None]) -> None:
        def check(case: Case) -> None:
            folder = work / f"c-{len(cases)}"
            shutil.copytree(base, folder)
            cfg = folder / "kbs.toml"
            cfg.write_text(
                config.read_text().replace(str(base / "index"), str(folder / "index")),
                encoding="utf-8",
            )
            damage(folder / "index" / kb)
            _expect_index_error(case, cfg, kb)

        run_case(cases, name, "corrupted index", check)

    def truncate(pattern: str) -> Callable[[Path], None]:
        def f(d: Path) -> None:
            target = next(p for p in d.rglob(pattern) if p.is_file())
            data = target.read_bytes()
            target.write_bytes(data[: len(data) // 3])

        return f

    def edit_manifest(d: Path) -> None:
        m = d / "manifest.json"
        data = json.loads(m.read_text())
        data["n_items"] = int(data.get("n_items", 0)) + 7
        m.write_text(json.dumps(data))

    corrupt("truncated FAISS file (text KB)", "text", truncate("faiss.index"))
    corrupt("manifest edited (n_items changed, tables KB)", "tables", edit_manifest)
    corrupt(
        "BM25 folder removed (images KB)",
        "images",
        lambda d: shutil.rmtree(next(p for p in d.iterdir() if p.is_dir() and "bm25" in p.name)),
    )
    corrupt("items file truncated (text KB)", "text", truncate("items*.jsonl"))

    for delay in (0.5, 2.0, 5.0):

        def kill_build(case: Case, delay: float = delay) -> None:
            args = [*KBROUTER, "index", "--config", str(config), "--force"]
            proc = subprocess.Popen(
                args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            time.sleep(delay)
            finished = proc.poll() is not None
            if not finished:
                proc.send_signal(signal.SIGKILL)
            proc.wait()
            after_kill = _search_all(config)
            same = after_kill == reference
            rebuilt = _build(config, force=False)
            after_rebuild = _search_all(config)
            case.passed = same and rebuilt.returncode == 0 and after_rebuild == reference
            case.detail = (
                ("build had already finished; " if finished else f"killed after {delay:g} s; ")
                + f"previous index usable and identical: {same}; next build exit "
                f"{rebuilt.returncode}, identical results: {after_rebuild == reference}"
            )
            case.seen = "the old index keeps answering; the next `kbrouter index` completes"

        run_case(
            cases, f"kill -9 during `kbrouter index --force` at {delay:g} s", "crash", kill_build
        )


# --------------------------------------------------------------------------- eval


def _eval_args(config: Path, url: str, out: Path, spec: str = "") -> list[str]:
    return [
        *KBROUTER,
        "eval",
        "-d",
        f"jsonl:{DEMO / 'questions.jsonl'}",
        "-m",
        "all-kbs",
        "--kbs",
        str(config),
        "--model",
        f"openai:fake@{url};max_retries=0{spec}",
        "--concurrency",
        "1",
        "--out",
        str(out),
    ]


def eval_cases(cases: list[Case], work: Path) -> None:
    base = work / "ev"
    base.mkdir()
    config = _demo_config(base)
    if _build(config).returncode != 0:
        raise RuntimeError("demo index build failed")
    from kbrouter.eval.harness import load_results

    server = FakeServer(latency=0.3).start()
    try:

        def kill_eval(case: Case) -> None:
            full = base / "full"
            r = subprocess.run(
                _eval_args(config, server.url, full), env=ENV, capture_output=True, text=True
            )
            if r.returncode != 0:
                raise RuntimeError(f"uninterrupted eval failed: {r.stderr[-400:]}")
            out = base / "killed"
            proc = subprocess.Popen(
                _eval_args(config, server.url, out),
                env=ENV,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            deadline = time.time() + 120
            while time.time() < deadline:
                if len(load_results(out)) >= 3 or proc.poll() is not None:
                    break
                time.sleep(0.05)
            killed_at = len(load_results(out))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            r2 = subprocess.run(
                _eval_args(config, server.url, out), env=ENV, capture_output=True, text=True
            )
            lines = load_results(out)
            ids = [x["id"] for x in lines]
            ref = {x["id"]: x["prediction"] for x in load_results(full)}
            got = {x["id"]: x["prediction"] for x in lines}
            case.passed = r2.returncode == 0 and len(ids) == len(set(ids)) and got == ref
            case.detail = (
                f"killed with {killed_at} of {len(ref)} rows written; resumed exit "
                f"{r2.returncode}; rows {len(ids)} (unique {len(set(ids))}); predictions equal "
                f"the uninterrupted run's: {got == ref}"
            )
            case.seen = "re-running the same command resumes where it stopped"

        run_case(cases, "kill -9 during `kbrouter eval`, then resume", "crash", kill_eval)

        def server_fault(name: str, control: dict[str, Any], expect: str, spec: str = "") -> None:
            def check(case: Case) -> None:
                server.control(reset=True, **control)
                out = base / f"fault-{len(cases)}"
                args = _eval_args(config, server.url, out, spec)
                r = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=600)
                server.control(reset=True)
                errors = [x.get("error") or "" for x in load_results(out)]
                text = (r.stdout + r.stderr).strip()
                first_error = next((e for e in errors if e), "")
                case.seen = (first_error or (text.splitlines()[-1] if text else ""))[:300]
                case.passed = "Traceback" not in text and expect in (text + " ".join(errors))
                n_err = sum(1 for e in errors if e)
                case.detail = f"exit {r.returncode}; {n_err} error rows of {len(errors)}"

            run_case(cases, name, "model server", check)

        server_fault(
            "server hangs (answers after the 1 s timeout)",
            {"sleep": 3.0},
            "no complete response within 1 s",
            spec=";timeout=1",
        )
        server_fault("server returns garbage (HTML)", {"garbage": "nonjson"}, "non-JSON response")
        server_fault("server returns HTTP 500s", {"fail": [500] * 40}, "HTTP 500")

        def server_dies(case: Case) -> None:
            dying = FakeServer(latency=0.3).start()
            out = base / "dies"
            proc = subprocess.Popen(
                _eval_args(config, dying.url, out),
                env=ENV,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            deadline = time.time() + 120
            while time.time() < deadline and len(load_results(out)) < 2 and proc.poll() is None:
                time.sleep(0.05)
            dying.kill()
            stdout, stderr = proc.communicate(timeout=300)
            lines = load_results(out)
            text = (stdout + stderr).strip()
            case.seen = text.splitlines()[-1] if text else ""
            case.passed = (
                proc.returncode == 2
                and "could not reach the server" in text
                and "Traceback" not in text
                and sum(1 for x in lines if x.get("error")) <= 3
            )
            case.detail = (
                f"exit {proc.returncode}; {len(lines)} rows written, "
                f"{sum(1 for x in lines if x.get('error'))} with errors, then one error"
            )

        run_case(cases, "server dies mid-run (circuit breaker)", "model server", server_dies)
    finally:
        server.kill()


# --------------------------------------------------------------------------- bad inputs


def bad_input_cases(cases: list[Case], work: Path) -> None:
    bad_utf8 = work / "latin1.jsonl"
    bad_utf8.write_bytes(b'{"question": "caf\xe9?", "answers": ["x"]}\n')
    not_image = work / "not-an-image.jpg"
    not_image.write_text("hello")
    bad_toml = work / "bad.toml"
    bad_toml.write_text(
        '[[kb]]\nname = "t"\ndescription = "d"\nmodality = "text"\n'
        'source = { path = "x.jsonl" }\nretrieval = { mode = "fuzzy" }\n'
    )
    missing_src = work / "missing.toml"
    missing_src.write_text(
        '[[kb]]\nname = "t"\ndescription = "d"\nmodality = "text"\n'
        'source = { path = "nope.jsonl" }\n'
    )
    inputs = [
        (
            "ask: missing image",
            ["ask", "Which flag?", "--image", str(work / "nope.jpg")],
            "image not found",
        ),
        (
            "ask: undecodable image",
            ["ask", "Which flag?", "--image", str(not_image)],
            "cannot decode",
        ),
        ("ask: empty question", ["ask", "  "], "empty"),
        (
            "ask: unknown method",
            ["ask", "q?", "--method", "magic", "--kbs", str(DEMO / "kbs.toml")],
            "unknown method",
        ),
        (
            "ask: bad model spec",
            ["ask", "q?", "--model", "gpt:x", "--kbs", str(DEMO / "kbs.toml")],
            "unknown model spec",
        ),
        (
            "ask: model spec setting not key=value",
            [
                "ask",
                "q?",
                "--model",
                "openai:m@http://127.0.0.1:9/v1;vision",
                "--kbs",
                str(DEMO / "kbs.toml"),
            ],
            "not key=value",
        ),
        ("index: bad kbs.toml field", ["index", "--config", str(bad_toml)], "kb[0].retrieval.mode"),
        ("index: missing source file", ["index", "--config", str(missing_src)], "file not found"),
        (
            "eval: unknown dataset",
            ["eval", "--dataset", "nope", "--method", "direct"],
            "unknown dataset",
        ),
        (
            "eval: non-UTF-8 dataset file",
            [
                "eval",
                "--dataset",
                f"jsonl:{bad_utf8}",
                "--method",
                "direct",
                "--kbs",
                str(DEMO / "kbs.toml"),
            ],
            "not UTF-8",
        ),
        (
            "eval: unknown source",
            [
                "eval",
                "--dataset",
                "mkqa-mini",
                "--method",
                "direct",
                "--source",
                "nope",
                "--kbs",
                str(DEMO / "kbs.toml"),
            ],
            "no source 'nope'",
        ),
        (
            "eval: oracle-evidence without gold evidence",
            [
                "eval",
                "--dataset",
                f"jsonl:{work / 'plain.jsonl'}",
                "--method",
                "oracle-evidence",
                "--kbs",
                str(DEMO / "kbs.toml"),
            ],
            "gold",
        ),
        (
            "route: router folder missing",
            ["route", "--router", str(work / "no-router"), "q?"],
            "no-router",
        ),
        ("report: results folder missing", ["report", str(work / "no-results")], "not found"),
    ]
    (work / "plain.jsonl").write_text('{"question": "q?", "answers": ["a"]}\n')
    for name, argv, expect in inputs:

        def check(case: Case, argv: list[str] = argv, expect: str = expect) -> None:
            # a real process per input: exactly what a user sees (exit code, stderr)
            res = subprocess.run(
                [*KBROUTER, *argv], capture_output=True, text=True, env=ENV, timeout=600
            )
            text = res.stdout + res.stderr
            case.seen = " ".join(res.stderr.split())[:300] or " ".join(text.split())[:300]
            flat = "".join(text.lower().split())  # rich wraps long paths across lines
            found = "".join(expect.lower().split()) in flat
            case.passed = res.returncode == 2 and found and "Traceback" not in text
            case.detail = f"exit {res.returncode}" + (
                "" if case.passed else f"; expected {expect!r}"
            )

        run_case(cases, name, "bad input", check)


def api_cases(cases: list[Case], work: Path) -> None:
    """Bad input through the Python API: a named kbrouter error, never a raw exception."""
    import asyncio

    from kbrouter.engine.engine import Engine
    from kbrouter.errors import KBRouterError
    from kbrouter.eval.datasets import load_dataset, load_jsonl
    from kbrouter.kb.registry import KBRegistry
    from kbrouter.models.registry import load_model
    from kbrouter.policies.baselines import make_policy
    from kbrouter.routing.router import LearnedRouter
    from kbrouter.testing import ScriptedChatModel, StaticKB, StaticKBRegistry
    from kbrouter.types import Query

    (work / "api-bad.toml").write_text('[[kb]]\nname = "t"\nmodality = "text"\n')
    (work / "api-latin1.jsonl").write_bytes(b'{"question": "caf\xe9?", "answers": ["x"]}\n')
    (work / "api-noanswer.jsonl").write_text('{"question": "q?"}\n')

    def unknown_kb() -> None:
        engine = Engine(
            ScriptedChatModel([]), StaticKBRegistry([StaticKB("text")]), make_policy("direct")
        )

        async def go() -> None:
            from kbrouter.engine.runtime import QuestionRuntime

            ctx = engine._context(None)
            r = await QuestionRuntime(ctx, None).retrieve("nowhere", Query(text="q"))
            await ctx.aclose()
            raise KBRouterError(r.error or "no error")

        asyncio.run(go())

    calls = [
        (
            "KBRegistry.from_config: missing field",
            lambda: KBRegistry.from_config(work / "api-bad.toml"),
            "description",
        ),
        (
            "KBRegistry.from_config: missing file",
            lambda: KBRegistry.from_config(work / "none.toml"),
            "none.toml",
        ),
        ("load_model: unknown spec", lambda: load_model("gpt:x"), "unknown model spec"),
        (
            "load_model: unknown backend setting",
            lambda: load_model("openai:m@http://127.0.0.1:9/v1;nope=1"),
            "nope",
        ),
        ("make_policy: unknown method", lambda: make_policy("magic"), "unknown method"),
        (
            "make_policy: bad setting",
            lambda: make_policy("r1-router", min_retrieval_steps=-1),
            "min_retrieval_steps",
        ),
        ("load_dataset: unknown name", lambda: load_dataset("nope"), "unknown dataset"),
        ("load_jsonl: not UTF-8", lambda: load_jsonl(work / "api-latin1.jsonl"), "not UTF-8"),
        ("load_jsonl: no answers", lambda: load_jsonl(work / "api-noanswer.jsonl"), "answers"),
        (
            "LearnedRouter.load: no router",
            lambda: LearnedRouter.load(work / "no-router"),
            "manifest",
        ),
        ("Runtime.retrieve: unknown KB", unknown_kb, "unknown knowledge base 'nowhere'"),
    ]
    for name, fn, expect in calls:

        def check(case: Case, fn: Callable[[], Any] = fn, expect: str = expect) -> None:
            try:
                fn()
            except KBRouterError as e:
                case.seen = str(e)[:300]
                case.passed = expect.lower() in str(e).lower()
                case.detail = type(e).__name__ + ("" if case.passed else f"; expected {expect!r}")
                return
            except Exception as e:  # noqa: BLE001 - a raw exception is the failure
                case.seen = f"{type(e).__name__}: {e}"[:300]
                case.detail = f"raw {type(e).__name__}, not a kbrouter error"
                return
            case.detail = "no error raised"

        run_case(cases, name, "bad input (Python API)", check)


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--fuzz", type=int, default=100_000, help="generated router outputs")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--only", default="", help="comma-separated categories to run")
    args = ap.parse_args()
    os.environ.update({"HF_HUB_OFFLINE": "1"})
    only = {c.strip() for c in args.only.split(",") if c.strip()}
    cases: list[Case] = []
    with tempfile.TemporaryDirectory(prefix="kbrouter-faults-") as tmp:
        work = Path(tmp)
        if not only or "fuzz" in only:
            run_case(cases, "parser fuzz", "parser", lambda c: case_parser_fuzz(c, args.fuzz))
        if not only or "bad-input" in only:
            bad_input_cases(cases, work)
        if not only or "index" in only:
            index_cases(cases, work)
        if not only or "eval" in only:
            eval_cases(cases, work)
        if not only or "api" in only:
            api_cases(cases, work)
    path = args.out / "reliability.json"
    if only and path.is_file():  # a partial run replaces only the categories it ran
        ran = {c.category for c in cases}
        kept = [r for r in json.loads(path.read_text())["results"] if r["category"] not in ran]
        for r in kept:
            c = Case(r["name"], r["category"])
            c.passed, c.detail, c.seen, c.seconds = (
                r["passed"],
                r["detail"],
                r["user_sees"],
                r["seconds"],
            )
            cases.insert(0, c)
    result = {
        "cases": len(cases),
        "passed": sum(c.passed for c in cases),
        "results": [c.to_json() for c in cases],
        "machine": {"cpus": os.cpu_count()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    tmp_json = args.out / ".reliability.json.tmp"
    tmp_json.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp_json, args.out / "reliability.json")
    lines = [
        "# Reliability: fault injection",
        "",
        f"{result['passed']} of {result['cases']} cases pass "
        "(`benchmarks/bench_reliability.py`; no model is run: the model server is the tests' fake "
        "OpenAI-compatible server, the KBs are the demo KBs).",
        "",
        "| category | case | result | detail | what a user sees |",
        "|---|---|---|---|---|",
    ]
    for c in cases:
        seen = c.seen.replace("|", "\\|").replace("\n", " ")[:160]
        lines.append(
            f"| {c.category} | {c.name} | {'pass' if c.passed else '**FAIL**'} | "
            f"{c.detail.replace('|', '/')} | {seen} |"
        )
    (args.out / "reliability.md").write_text("\n".join(lines) + "\n")
    print(f"{result['passed']}/{result['cases']} passed")


if __name__ == "__main__":
    main()
