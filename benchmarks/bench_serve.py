# ruff: noqa: E501  (the table of hand-written fuzz cases reads best one case per line)
"""Serving benchmarks on loopback: a bounded load test and a malformed-request barrage.

The server is the real app (``kbrouter.serve.app``) over the demo KBs (BM25) with the scripted
model answering every call after a fixed delay (default 200 ms), run in its own process by
uvicorn so the load generator does not share its interpreter.

``load``: N = 1, 8, 32, 64 concurrent clients, each sending ``POST /v1/answer`` one after the
other for a bounded number of requests and seconds; throughput, p50/p95/p99 latency, errors.
The engine alone (the same model, KBs and policy, ``Engine.answer`` with N questions at once,
in-process) gives the baseline, so the server's overhead per request is reported in ms and as a
ratio of latencies at N = 32, and as CPU time: the server process's CPU per request against the
engine's CPU per question (the latency overhead also holds the load generator's own CPU, which
shares the machine's cores). Writes ``load.json`` / ``load.md``.

``fuzz``: schemathesis generates requests from the server's OpenAPI spec (bounded examples,
seeded) and checks that none gets a 5xx; then hand-written bad bodies: broken multipart,
bodies over the size limit (by length and chunked), image bombs (huge declared dimensions,
a decompression bomb), non-images, truncated images, bad base64, deep JSON, NUL bytes, path
traversal on the image route. Writes ``fuzz.json`` / ``fuzz.md`` with ``requests`` and
``server_errors``.

    .venv/bin/python benchmarks/bench_serve.py load
    .venv/bin/python benchmarks/bench_serve.py fuzz --max-examples 50
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OUT = HERE / "results" / "serve"
QUESTION = "What is the capital of Australia?"


def reply(messages) -> str:
    """One text hop, then stop; every answer is Canberra (the engine's usual 4 calls)."""
    system, last = messages[0].text(), messages[-1].text()
    if "<ret>" in system:
        if "Answer 1:" in last:
            return "<think>done</think><sub-question>None</sub-question><ret>None</ret>"
        sub = "<sub-question>Which city is the capital of Australia?</sub-question>"
        return f"<think>t</think>{sub}<ret>text</ret>"
    return "<answer>Canberra</answer>"


def _registry(index_dir: Path):
    from kbrouter.testing import demo_registry

    return demo_registry(index_dir)


def serve(port: int, latency: float, max_concurrent: int) -> None:
    """The server process: the app on 127.0.0.1:port."""
    import uvicorn

    from kbrouter.serve.app import ServeConfig, create_app
    from kbrouter.testing import ScriptedChatModel

    with tempfile.TemporaryDirectory() as tmp:
        registry = _registry(Path(tmp))
        model = ScriptedChatModel(reply, latency=latency)
        app = create_app(model, registry, ServeConfig(max_concurrent=max_concurrent))
        uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


class Server:
    """``serve`` in a subprocess, waited for until /readyz answers."""

    def __init__(self, latency: float, max_concurrent: int = 128) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [sys.executable, __file__, "serve", "--port", str(self.port)]
        self.args += ["--latency", str(latency), "--max-concurrent", str(max_concurrent)]

    def __enter__(self) -> Server:
        import httpx

        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen(self.args, env=env)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError("the server process exited")
            time.sleep(0.2)
        raise RuntimeError("the server did not become ready")

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the server process has used so far."""
        import psutil

        t = psutil.Process(self.proc.pid).cpu_times()
        return t.user + t.system

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(20)


def _pct(values: list[float], q: float) -> float:
    vs = sorted(values)
    return vs[min(len(vs) - 1, max(0, round(q * (len(vs) - 1))))]


def _stats(latencies: list[float]) -> dict:
    ms = [x * 1000 for x in latencies]
    return {
        "p50_ms": round(_pct(ms, 0.50), 1),
        "p95_ms": round(_pct(ms, 0.95), 1),
        "p99_ms": round(_pct(ms, 0.99), 1),
        "mean_ms": round(statistics.fmean(ms), 1),
    }


async def _clients(url: str, n: int, per_client: int, max_seconds: float) -> dict:
    import httpx

    latencies: list[float] = []
    errors: dict[str, int] = {}
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        stop_at = time.monotonic() + max_seconds

        async def one_client() -> None:
            for _ in range(per_client):
                if time.monotonic() > stop_at:
                    return
                t = time.perf_counter()
                try:
                    r = await client.post("/v1/answer", json={"question": QUESTION})
                    ok = r.status_code == 200 and r.json()["answer"] == "Canberra"
                    key = "ok" if ok else f"status {r.status_code}"
                except httpx.HTTPError as e:
                    key = type(e).__name__
                if key == "ok":
                    latencies.append(time.perf_counter() - t)
                else:
                    errors[key] = errors.get(key, 0) + 1

        t0 = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(n)))
        wall = time.perf_counter() - t0
    done = len(latencies) + sum(errors.values())
    return {
        "clients": n,
        "requests": done,
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "seconds": round(wall, 2),
        "throughput_rps": round(len(latencies) / wall, 2),
        **(_stats(latencies) if latencies else {}),
    }


async def _engine_alone(n: int, rounds: int, latency: float) -> dict:
    from kbrouter.engine.engine import Engine, EngineConfig
    from kbrouter.policies.baselines import make_policy
    from kbrouter.testing import ScriptedChatModel
    from kbrouter.types import Question

    with tempfile.TemporaryDirectory() as tmp:
        registry = _registry(Path(tmp))
        model = ScriptedChatModel(reply, latency=latency)
        engine = Engine(
            model, registry, make_policy("r1-router"), EngineConfig(max_steps=3, top_k=5)
        )
        latencies: list[float] = []

        async def one() -> None:
            t = time.perf_counter()
            traj = await engine.answer(Question(text=QUESTION))
            assert traj.answer == "Canberra", traj.answer
            latencies.append(time.perf_counter() - t)

        await one()  # warm-up, unmeasured
        latencies.clear()
        cpu = time.process_time()
        for _ in range(rounds):
            await asyncio.gather(*(one() for _ in range(n)))
        cpu_ms = 1000 * (time.process_time() - cpu) / len(latencies)
        engine.close()
        registry.close()
    return {
        "clients": n,
        "requests": len(latencies),
        "cpu_ms_per_question": round(cpu_ms, 2),
        **_stats(latencies),
    }


def load(args) -> None:
    levels = [int(x) for x in args.clients.split(",")]
    rows = []
    with Server(args.latency) as server:
        asyncio.run(_clients(server.url, 1, 2, 60))  # warm-up (first-request setup), unmeasured
        for n in levels:
            per = max(args.min_requests // n, 2)
            cpu = server.cpu_seconds()
            rows.append(asyncio.run(_clients(server.url, n, per, args.max_seconds)))
            # the server process's own CPU time per request (all its threads)
            rows[-1]["server_cpu_ms_per_request"] = round(
                1000 * (server.cpu_seconds() - cpu) / max(rows[-1]["requests"], 1), 2
            )
            print(rows[-1], flush=True)
    # the engine alone on the event loop the server runs on (uvloop when installed)
    runner = asyncio.run
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        pass
    base = runner(_engine_alone(32, 4, args.latency))  # 128 questions, as the server level
    at32 = next((r for r in rows if r["clients"] == 32), None)
    overhead = None
    if at32 and "p50_ms" in at32:
        overhead = {
            "clients": 32,
            "server_p50_ms": at32["p50_ms"],
            "engine_p50_ms": base["p50_ms"],
            "overhead_ms": round(at32["p50_ms"] - base["p50_ms"], 1),
            "ratio": round(at32["p50_ms"] / base["p50_ms"], 4),
            "server_cpu_ms_per_request": at32["server_cpu_ms_per_request"],
            "engine_cpu_ms_per_question": base["cpu_ms_per_question"],
            "cpu_overhead_ms": round(
                at32["server_cpu_ms_per_request"] - base["cpu_ms_per_question"], 2
            ),
        }
    result = {
        "setup": {
            "model": f"scripted, {args.latency * 1000:.0f} ms per call (4 calls per question)",
            "kbs": "demo KBs, BM25",
            "method": "r1-router",
            "server": f"uvicorn, 1 process, loopback, {_uvicorn_impl()}",
            "min_requests_per_level": args.min_requests,
            "max_seconds_per_level": args.max_seconds,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        },
        "levels": rows,
        "engine_alone": base,
        "overhead_at_32": overhead,
        "errors": sum(r["errors"] for r in rows),
    }
    _write("load", result, _load_md(result))


def _uvicorn_impl() -> str:
    """What uvicorn's ``auto`` picks here: uvloop and httptools when installed (the ``serve``
    extra's ``uvicorn[standard]``), else asyncio and the pure-Python h11."""
    import importlib.util

    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return f"{loop} + {http}"


def _load_md(r: dict) -> str:
    lines = [
        "# Serving load test (loopback)",
        "",
        f"{r['setup']['model']}; {r['setup']['kbs']}; {r['setup']['method']}; "
        f"{r['setup']['server']}.",
        "",
        "| clients | requests | errors | throughput (req/s) | p50 ms | p95 ms | p99 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for x in r["levels"]:
        lines.append(
            f"| {x['clients']} | {x['requests']} | {x['errors']} | {x['throughput_rps']} | "
            f"{x.get('p50_ms', '–')} | {x.get('p95_ms', '–')} | {x.get('p99_ms', '–')} |"
        )
    o = r["overhead_at_32"]
    if o:
        lines += [
            "",
            f"Engine alone at 32 questions at once: p50 {o['engine_p50_ms']} ms; through the "
            f"server {o['server_p50_ms']} ms: overhead {o['overhead_ms']} ms per request "
            f"(ratio {o['ratio']}).",
            "",
            f"CPU per request: the server process {o['server_cpu_ms_per_request']} ms, the "
            f"engine alone {o['engine_cpu_ms_per_question']} ms per question: the server adds "
            f"{o['cpu_overhead_ms']} ms of CPU per request (HTTP, JSON, auth, limits).",
        ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- fuzz


def _png(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares ``width`` x ``height`` (an image bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _bomb_png() -> bytes:
    """A real decompression bomb: 12000 x 12000 black pixels, a few hundred KB compressed."""
    raw = zlib.compressobj(9)
    row = b"\x00" + b"\x00" * 12000
    body = b"".join(raw.compress(row) for _ in range(12000)) + raw.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", 12000, 12000, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def _hand_written(url: str) -> list[dict]:
    import httpx
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), "red").save(buf, format="JPEG")
    jpeg = buf.getvalue()
    b64 = base64.b64encode
    cases: list[tuple[str, str, str, dict]] = [
        ("json: not JSON", "POST", "/v1/answer", {"content": b"{nope", "headers": {"content-type": "application/json"}}),
        ("json: deep nesting", "POST", "/v1/answer", {"content": b"[" * 5000 + b"]" * 5000, "headers": {"content-type": "application/json"}}),
        ("json: NUL bytes in the question", "POST", "/v1/answer", {"json": {"question": "a\x00b\x00"}}),
        ("json: question of 1 MB", "POST", "/v1/answer", {"json": {"question": "x" * 1_000_000}}),
        ("json: wrong types", "POST", "/v1/answer", {"json": {"question": 5, "top_k": "many"}}),
        ("json: unknown method", "POST", "/v1/answer", {"json": {"question": QUESTION, "method": "../../etc"}}),
        ("json: bad base64", "POST", "/v1/answer", {"json": {"question": QUESTION, "image_base64": "%%%"}}),
        ("json: base64 of text", "POST", "/v1/answer", {"json": {"question": QUESTION, "image_base64": b64(b"hello").decode()}}),
        ("json: truncated JPEG", "POST", "/v1/answer", {"json": {"question": QUESTION, "image_base64": b64(jpeg[: len(jpeg) // 3]).decode()}}),
        ("json: PNG header declaring 100000 x 100000", "POST", "/v1/answer", {"json": {"question": QUESTION, "image_base64": b64(_png(100_000, 100_000)).decode()}}),
        ("json: decompression bomb 12000 x 12000", "POST", "/v1/answer", {"json": {"question": QUESTION, "image_base64": b64(_bomb_png()).decode()}}),
        ("multipart: no boundary", "POST", "/v1/answer", {"content": b"--x\r\n", "headers": {"content-type": "multipart/form-data"}}),
        ("multipart: unterminated part", "POST", "/v1/answer", {"content": b'--xx\r\nContent-Disposition: form-data; name="question"\r\n\r\nq', "headers": {"content-type": "multipart/form-data; boundary=xx"}}),
        ("multipart: two images", "POST", "/v1/answer", {"data": {"question": QUESTION}, "files": [("image", ("a.jpg", jpeg, "image/jpeg")), ("image", ("b.jpg", jpeg, "image/jpeg"))]}),
        ("multipart: image as text field", "POST", "/v1/answer", {"data": {"question": QUESTION, "image": "x"}}),
        ("multipart: EPS declared as PNG", "POST", "/v1/answer", {"data": {"question": QUESTION}, "files": {"image": ("x.png", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 1 1\n", "image/png")}}),
        ("multipart: PNG bomb header", "POST", "/v1/answer", {"data": {"question": QUESTION}, "files": {"image": ("x.png", _png(60_000, 60_000), "image/png")}}),
        ("body: chunked 20 MB", "POST", "/v1/search", {"content": (b"x" * 1_000_000 for _ in range(20)), "headers": {"content-type": "application/json"}}),
        ("search: unknown KB", "POST", "/v1/search", {"json": {"kb": "nowhere", "query": "x"}}),
        ("search: empty query", "POST", "/v1/search", {"json": {"kb": "text", "query": " "}}),
        ("images: path traversal", "GET", "/v1/images/images/..%2F..%2F..%2Fetc%2Fpasswd", {}),
        ("images: unknown KB", "GET", "/v1/images/nowhere/flag_au", {}),
        ("results: unknown", "GET", "/v1/results/..%2F..", {}),
        ("viewer: other file", "GET", "/viewer/..%2F..%2Fapp.py", {}),
        ("chat: no messages", "POST", "/v1/chat/completions", {"json": {"model": "kbrouter/r1-router"}}),
        ("chat: image URL that is not data", "POST", "/v1/chat/completions", {"json": {"model": "kbrouter/r1-router", "messages": [{"role": "user", "content": [{"type": "text", "text": "q"}, {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]}}),
    ]  # fmt: skip
    out = [{"case": "body: Content-Length 10 GB (raw socket)", "status": _raw_big_length(url)}]
    print(out[0]["case"], out[0]["status"], flush=True)
    with httpx.Client(base_url=url, timeout=60) as client:
        for name, method, path, kw in cases:
            try:
                status = client.request(method, path, **kw).status_code
            except httpx.HTTPError as e:
                status = f"{type(e).__name__}"
            out.append({"case": name, "status": status})
            print(name, status, flush=True)
    return out


def _raw_big_length(url: str) -> int | str:
    """A request declaring a 10 GB body (httpx will not send one): the status line's code."""
    host, port = url.rsplit("//", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/answer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 10000000000\r\n\r\n{}"
        )
        line = sock.makefile("rb").readline().decode("latin-1").split()
    return int(line[1]) if len(line) > 1 and line[1].isdigit() else "no response"


def fuzz(args) -> None:
    with tempfile.TemporaryDirectory() as tmp, Server(0.0) as server:
        har = Path(tmp) / "run.har"
        cmd = [
            str(Path(sys.executable).parent / "schemathesis"),
            "run",
            f"{server.url}/openapi.json",
            "--checks",
            "not_a_server_error",
            "--max-examples",
            str(args.max_examples),
            "--seed",
            str(args.seed),
            "--report",
            "har",
            "--report-har-path",
            str(har),
            "--exclude-path",
            "/v1/chat/completions",  # no schema for its body: covered by the hand-written cases
            "--request-timeout",
            "30",
        ]
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - t
        entries = json.loads(har.read_text())["log"]["entries"] if har.is_file() else []
        statuses: dict[str, int] = {}
        for e in entries:
            key = str(e["response"]["status"])
            statuses[key] = statuses.get(key, 0) + 1
        hand = _hand_written(server.url)
    server_errors = sum(n for s, n in statuses.items() if s.startswith("5"))
    hand_errors = [c for c in hand if not isinstance(c["status"], int) or c["status"] >= 500]
    result = {
        "setup": {
            "schemathesis": subprocess.run(
                [cmd[0], "--version"], capture_output=True, text=True
            ).stdout.strip(),
            "max_examples": args.max_examples,
            "seed": args.seed,
            "checks": "not_a_server_error",
            "server": "the app on the demo KBs (BM25) with the scripted model",
        },
        "schemathesis": {
            "requests": len(entries),
            "statuses": dict(sorted(statuses.items())),
            "server_errors": server_errors,
            "exit_code": proc.returncode,
            "seconds": round(seconds, 1),
            "summary": proc.stdout.strip().splitlines()[-12:],
        },
        "hand_written": hand,
        "requests": len(entries) + len(hand),
        "server_errors": server_errors + len(hand_errors),
    }
    lines = [
        "# Malformed-request barrage",
        "",
        f"schemathesis ({result['setup']['schemathesis']}, {args.max_examples} examples per "
        f"operation, seed {args.seed}, check not_a_server_error): {len(entries)} requests, "
        f"statuses {result['schemathesis']['statuses']}, {server_errors} server errors.",
        "",
        "| hand-written case | status |",
        "|---|---|",
        *(f"| {c['case']} | {c['status']} |" for c in hand),
        "",
        f"In all: {result['requests']} requests, {result['server_errors']} server errors.",
    ]
    _write("fuzz", result, "\n".join(lines) + "\n")


def _write(name: str, result: dict, md: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    tmp = OUT / f".{name}.json.tmp"
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, OUT / f"{name}.json")
    (OUT / f"{name}.md").write_text(md)
    print(md)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--latency", type=float, default=0.2)
    s.add_argument("--max-concurrent", type=int, default=128)
    lo = sub.add_parser("load")
    lo.add_argument("--clients", default="1,8,32,64")
    lo.add_argument("--latency", type=float, default=0.2)
    lo.add_argument("--min-requests", type=int, default=128)
    lo.add_argument("--max-seconds", type=float, default=30.0)
    fz = sub.add_parser("fuzz")
    fz.add_argument("--max-examples", type=int, default=50)
    fz.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.cmd == "serve":
        serve(args.port, args.latency, args.max_concurrent)
    elif args.cmd == "load":
        load(args)
    else:
        fuzz(args)


if __name__ == "__main__":
    main()
