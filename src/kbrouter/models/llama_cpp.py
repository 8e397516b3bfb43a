"""In-process chat backend on llama-cpp-python (GGUF models on CPU).

The default model is the packaged Qwen2.5-Coder-0.5B-Instruct (see :mod:`kbrouter.models.gguf`).
Prompts are formatted with the GGUF's own chat template (``create_chat_completion``), token
counts come from the response usage.

Concurrency: one ``llama_cpp.Llama`` is not thread-safe, so calls are serialised (an asyncio lock
per event loop plus a thread lock) and run in a worker thread (``asyncio.to_thread``); the event
loop stays free for retrieval and HTTP work meanwhile.

Prefix reuse (``prefix_cache``):

- ``"consecutive"``: llama.cpp keeps the KV cache of the previous call and re-evaluates only the
  tokens after the longest common prefix. Helps when the same prompt grows step by step, but
  the loop alternates prompts (route, sub-answer, route, ...) so every switch re-evaluates the
  whole system prompt.
- ``"ram"`` (default): additionally, when the next prompt switches to another prompt family,
  the current KV state is saved to a small in-memory LRU, and a saved state sharing a longer
  prefix with the next prompt is restored; so each family (router, answerer, ...) keeps its
  system prompt warm across alternations. (Not ``llama_cpp.LlamaRAMCache``: it saves after
  every call and each saved state drags a copy of the n_batch x n_vocab score buffer, ~300 MB
  for Qwen, which its byte budget does not count.) Measured in ``benchmarks/bench_llm.py``
  (``benchmarks/results/llm.md``).
- ``"off"``: every call evaluates its full prompt (a baseline for benchmarks).

Grammars (``lazy_grammar``): llama-cpp-python applies a GBNF grammar to every vocabulary token at
every generated token, about 20 ms per token for Qwen's 151k-token vocabulary on two cores, as
much as the forward pass of the 0.5B model. For greedy calls (the evaluation and engine default)
the backend instead checks only the model's top token against the grammar, and masks the whole
vocabulary only when that token is not allowed; the greedy result is the same token (llama.cpp's
own ``common_sampler`` does this). Sampled calls keep llama-cpp-python's grammar sampler.
Measured in ``benchmarks/results/trained-router/`` (the latency stage).

A prompt longer than the context window raises :class:`~kbrouter.errors.ModelError` (no
truncation: dropping history silently would change answers); a reply that would run past the
window is cut at the window (``finish_reason="length"``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kbrouter.errors import ConfigError, ModelError
from kbrouter.models._messages import IMAGE_NOTE, text_only_messages
from kbrouter.models.base import ChatModel, PerLoopLock
from kbrouter.models.gguf import resolve_gguf
from kbrouter.types import ChatMessage, ChatResult, SamplingParams

logger = logging.getLogger(__name__)


def _cores() -> int:
    """``$KBROUTER_LLAMA_THREADS`` if set, else the CPUs this process may run on."""
    env = os.environ.get("KBROUTER_LLAMA_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class LlamaCppConfig(BaseModel):
    """Settings of :class:`LlamaCppModel`."""

    model_config = ConfigDict(extra="forbid")

    n_ctx: int = Field(4096, ge=256, description="Context window in tokens (prompt + reply).")
    n_threads: int = Field(
        default_factory=_cores,
        ge=1,
        description="CPU threads (default: $KBROUTER_LLAMA_THREADS or all cores). On a CPU shared "
        "with other busy processes use 1: llama.cpp threads spin at barriers, and a descheduled "
        "thread stalls every layer (measured 6x slower generation with 2 threads at load 15).",
    )
    n_batch: int = Field(512, ge=1, description="Prompt tokens evaluated per batch.")
    prefix_cache: Literal["ram", "consecutive", "off"] = Field(
        "ram", description="KV prefix reuse across calls (see the module docstring)."
    )
    cache_states: int = Field(
        8, ge=1, description="Saved KV states kept by the RAM prefix cache (prefix_cache='ram')."
    )
    cache_bytes: int = Field(
        512 << 20, ge=0, description="Byte budget of the saved KV states (prefix_cache='ram')."
    )
    timeout: float = Field(
        600.0, gt=0, description="Seconds one generation may take before it is stopped."
    )
    lazy_grammar: bool = Field(
        True,
        description="Greedy grammar-constrained calls check the grammar against the model's "
        "top token first and mask the whole vocabulary only when that token is not allowed "
        "(the same output; llama-cpp-python otherwise masks all ~150k tokens at every step).",
    )
    image_note: str = Field(IMAGE_NOTE, description="Text replacing image parts (text-only).")
    chat_format: str | None = Field(
        None, description="llama-cpp-python chat format; None uses the GGUF's chat template."
    )
    extra_buffer_types: bool | None = Field(
        None,
        description="ggml extra weight buffers (AMX / repacked kernels). None = auto: off when "
        "the CPU advertises AMX, whose kernels die with SIGILL in VMs that do not enable it.",
    )


_MIN_SAVE_TOKENS = 64
"""KV states shorter than this are not worth saving (re-evaluating them is cheap)."""


class _Deadline(Exception):
    pass


_PARAMS_LOCK = threading.Lock()


def cpu_advertises_amx() -> bool:
    """True if /proc/cpuinfo lists AMX tiles (Linux only; False elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " amx_tile" in line for line in f)
    except OSError:
        return False


@contextmanager
def _model_params_override(**fields: Any) -> Iterator[None]:
    """Make ``llama_model_default_params()`` return ``fields`` while a ``Llama`` is built.

    llama-cpp-python does not expose every llama.cpp model parameter (e.g. ``use_extra_bufts``)
    in ``Llama(...)``; the constructor starts from the default params, so the override is
    scoped to the construction (serialised by a lock) and restored afterwards.
    """
    from llama_cpp import llama_cpp as capi

    with _PARAMS_LOCK:
        original = capi.llama_model_default_params

        def patched() -> Any:
            params = original()
            for key, value in fields.items():
                setattr(params, key, value)
            return params

        capi.llama_model_default_params = patched
        try:
            yield
        finally:
            capi.llama_model_default_params = original


class LlamaCppModel(ChatModel):
    """A GGUF chat model run in-process by llama-cpp-python (text-only, GBNF grammar support).

    ``model`` is a preset name (``qwen2.5-coder-0.5b``, ``qwen2.5-coder-1.5b``,
    ``smollm2-135m``), a path to a ``.gguf`` file, or None for the default. The weights are
    loaded on the first call (or by :meth:`load`).
    """

    supports_images = False
    supports_grammar = True

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        config: LlamaCppConfig | None = None,
        **kwargs: Any,
    ):
        if config is None:
            try:
                config = LlamaCppConfig(**kwargs)
            except ValueError as e:
                raise ConfigError(f"invalid llama-cpp backend settings: {e}") from e
        elif kwargs:
            raise ConfigError("pass either config= or individual settings, not both")
        self.config = config
        self.model_path = resolve_gguf(model)
        self._identity: dict | None = None
        self._metadata: dict[str, str] | None = None
        self.name = self.model_path.stem
        self.context_window = config.n_ctx
        self._llm: Any = None
        self._thread_lock = threading.Lock()
        self._lock = PerLoopLock()
        self._grammars: dict[str, Any] = {}
        self._formatter: Any = None
        self._states: OrderedDict[tuple[int, ...], bytes] = OrderedDict()
        self.grammar_stats: Counter[str] = Counter()
        """Lazy-grammar steps (``steps``) and those whose top token the grammar refused
        (``full_masks``: the whole vocabulary was masked), over this model's calls."""

    # ------------------------------------------------------------------ public API

    def load(self) -> None:
        """Load the weights now (otherwise done by the first call)."""
        with self._thread_lock:
            self._load_locked()

    async def chat(
        self, messages: list[ChatMessage], params: SamplingParams | None = None
    ) -> ChatResult:
        params = params or SamplingParams()
        wire = text_only_messages(messages, self.config.image_note)
        async with self._lock.get():
            return await asyncio.to_thread(self._chat_sync, wire, params)

    async def aclose(self) -> None:
        await asyncio.to_thread(self._close_sync)

    def _close_sync(self) -> None:
        with self._thread_lock:  # waits for a running generation
            llm, self._llm = self._llm, None
            self._grammars.clear()
            self._states.clear()
        if llm is not None:
            llm.close()

    def describe(self) -> dict:
        cfg = self.config
        return {
            "backend": type(self).__name__,
            "name": self.name,
            "model_path": str(self.model_path),
            "n_ctx": cfg.n_ctx,
            "n_threads": cfg.n_threads,
            "prefix_cache": cfg.prefix_cache,
            "extra_buffer_types": cfg.extra_buffer_types,
        }

    @property
    def loaded(self) -> bool:
        """Whether the weights are in memory (the first call or :meth:`load` loads them)."""
        return self._llm is not None

    @property
    def kbrouter_metadata(self) -> dict[str, str]:
        """The GGUF's ``kbrouter.*`` metadata (written by ``kbrouter train export``), read from
        the loaded model or, before it is loaded, from the file's header (no weights)."""
        if self._metadata is None:
            from kbrouter.models.gguf import read_kbrouter_metadata

            self._metadata = read_kbrouter_metadata(self.model_path)
        return dict(self._metadata)

    @property
    def prompt_variant(self) -> str | None:
        from kbrouter.models.gguf import ROUTER_PROMPT_KEY

        return self.kbrouter_metadata.get(ROUTER_PROMPT_KEY)

    def identity(self) -> dict:
        """The GGUF's sha256 and the context size; not its path or the thread count."""
        if self._identity is None:
            from kbrouter.models.gguf import gguf_sha256

            self._identity = {
                "backend": "llama.cpp",
                "gguf_sha256": gguf_sha256(self.model_path),
                "n_ctx": self.config.n_ctx,
            }
        return dict(self._identity)

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` in this model's vocabulary (no special tokens added)."""
        with self._thread_lock:
            self._load_locked()
            return len(self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    # ------------------------------------------------------------------ internals

    def _load_locked(self) -> None:
        if self._llm is not None:
            return
        try:
            import llama_cpp
        except ImportError as e:
            raise ModelError(
                "the llama-cpp backend needs llama-cpp-python: pip install 'kbrouter[llm]'"
            ) from e
        cfg = self.config
        extra = cfg.extra_buffer_types
        if extra is None:
            extra = not cpu_advertises_amx()
        t0 = time.perf_counter()
        try:
            with _model_params_override(use_extra_bufts=extra):
                llm = llama_cpp.Llama(
                    model_path=str(self.model_path),
                    n_ctx=cfg.n_ctx,
                    n_threads=cfg.n_threads,
                    n_threads_batch=cfg.n_threads,
                    n_batch=cfg.n_batch,
                    chat_format=cfg.chat_format,
                    verbose=False,
                )
        except (ValueError, RuntimeError, OSError) as e:
            raise ModelError(f"llama.cpp cannot load {self.model_path}: {e}") from e
        self._llm = llm
        self._formatter = None
        from kbrouter.models.gguf import kbrouter_metadata

        self._metadata = kbrouter_metadata(llm.metadata)
        template = llm.metadata.get("tokenizer.chat_template")
        if cfg.chat_format is None and template:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            eos_id, bos_id = llm.token_eos(), llm.token_bos()
            self._formatter = Jinja2ChatFormatter(
                template=template,
                eos_token=llm._model.token_get_text(eos_id) if eos_id != -1 else "",
                bos_token=llm._model.token_get_text(bos_id) if bos_id != -1 else "",
                stop_token_ids=[eos_id],
            )
        logger.info("loaded %s in %.1f s", self.model_path.name, time.perf_counter() - t0)

    def _grammar(self, text: str) -> Any:
        """Compile (and validate) a GBNF grammar once per distinct string."""
        grammar = self._grammars.get(text)
        if grammar is None:
            import llama_cpp

            # LlamaGrammar.from_string does not parse; a bad grammar would give llama.cpp a NULL
            # sampler. Parse it here first so the error is a ModelError, not a crash.
            vocab = self._llm._model.vocab
            sampler = llama_cpp.llama_sampler_init_grammar(vocab, text.encode("utf-8"), b"root")
            if not sampler:
                raise ModelError(
                    f"invalid GBNF grammar (llama.cpp cannot parse it): {text[:200]!r}"
                )
            llama_cpp.llama_sampler_free(sampler)
            grammar = self._grammars[text] = llama_cpp.LlamaGrammar.from_string(text, verbose=False)
        return grammar

    def _chat_sync(self, wire: list[dict[str, str]], params: SamplingParams) -> ChatResult:
        with self._thread_lock:
            self._load_locked()
            llm = self._llm
            grammar = self._grammar(params.grammar) if params.grammar else None
            lazy = None
            if grammar is not None and params.temperature == 0 and self.config.lazy_grammar:
                lazy, grammar = _LazyGrammar(llm, params.grammar), None
            deadline = time.monotonic() + self.config.timeout

            def check_deadline(_ids: Any, scores: Any) -> Any:
                if time.monotonic() > deadline:
                    raise _Deadline
                return scores

            sampling: dict[str, Any] = {
                "temperature": params.temperature,
                "top_p": params.top_p,
                "top_k": 0,
                "min_p": 0.0,
                "max_tokens": params.max_tokens,
                "seed": params.seed,
                "grammar": grammar,
                "logits_processor": [check_deadline] if lazy is None else [check_deadline, lazy],
            }
            t0 = time.perf_counter()
            try:
                if self._formatter is None:  # an explicit llama-cpp-python chat_format
                    if self.config.prefix_cache == "off":
                        llm.reset()
                    out = llm.create_chat_completion(
                        messages=wire, stop=list(params.stop), **sampling
                    )
                    text = out["choices"][0]["message"].get("content") or ""
                else:
                    fmt = self._formatter(messages=wire)
                    tokens = llm.tokenize(
                        fmt.prompt.encode("utf-8"), add_bos=not fmt.added_special, special=True
                    )
                    if len(tokens) >= self.config.n_ctx:
                        raise ModelError(
                            f"prompt too long for {self.model_path.name}: {len(tokens)} tokens "
                            f"exceed the context window of {self.config.n_ctx} "
                            "(raise n_ctx or shorten the evidence)"
                        )
                    self._prepare_kv(tokens)
                    fmt_stop = fmt.stop if isinstance(fmt.stop, list) else [fmt.stop]
                    out = llm.create_completion(
                        prompt=tokens,
                        stop=list(params.stop) + [s for s in fmt_stop if s],
                        stopping_criteria=fmt.stopping_criteria,
                        **sampling,
                    )
                    text = out["choices"][0].get("text") or ""
            except _Deadline as e:
                raise ModelError(
                    f"llama.cpp generation with {self.model_path.name} exceeded "
                    f"{self.config.timeout:g} s"
                ) from e
            except ValueError as e:
                if "exceed context window" in str(e):
                    raise ModelError(
                        f"prompt too long for {self.model_path.name}: {e} "
                        "(raise n_ctx or shorten the evidence)"
                    ) from e
                raise ModelError(f"llama.cpp failed on {self.model_path.name}: {e}") from e
            except RuntimeError as e:
                raise ModelError(f"llama.cpp failed on {self.model_path.name}: {e}") from e
            finally:
                if lazy is not None:
                    self.grammar_stats.update(steps=lazy.steps, full_masks=lazy.full_masks)
                    lazy.close()
            seconds = time.perf_counter() - t0
        usage = out.get("usage") or {}
        return ChatResult(
            text=text,
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
            seconds=seconds,
            model=self.name,
            finish_reason=out["choices"][0].get("finish_reason"),
        )

    # ------------------------------------------------------------------ KV prefix cache

    def _prepare_kv(self, tokens: list[int]) -> None:
        """Leave in the llama context the KV state that best matches ``tokens``.

        ``consecutive`` keeps whatever the last call left (llama.cpp then re-evaluates only the
        tokens after the common prefix). ``ram`` also keeps a small LRU of saved KV states:
        when the new prompt shares less than half of the current context (a switch to another
        prompt family) the current state is saved, and a saved state sharing a longer prefix
        than the current one is restored. ``off`` starts from an empty context.
        """
        llm = self._llm
        mode = self.config.prefix_cache
        if mode == "off":
            llm.reset()
            return
        if mode != "ram":
            return
        current = llm.input_ids[: llm.n_tokens].tolist()
        shared = _common_prefix(current, tokens)
        best_key, best = None, shared
        for key in self._states:
            n = _common_prefix(key, tokens)
            if n > best:
                best_key, best = key, n
        switching = llm.n_tokens > 0 and shared < llm.n_tokens // 2
        # Take the state to restore before saving the current one: saving may evict it (LRU).
        restore = self._states[best_key] if best_key is not None else None
        if (switching or best_key is not None) and len(current) >= _MIN_SAVE_TOKENS:
            self._save_state(tuple(current))
        if best_key is not None and restore is not None:
            self._load_state(best_key, restore)

    def _save_state(self, key: tuple[int, ...]) -> None:
        import ctypes

        import llama_cpp

        if key in self._states:
            self._states.move_to_end(key)
            return
        ctx = self._llm._ctx.ctx
        size = llama_cpp.llama_state_get_size(ctx)
        buf = (ctypes.c_uint8 * size)()
        n = llama_cpp.llama_state_get_data(ctx, buf, size)
        self._states[key] = ctypes.string_at(buf, n)
        while len(self._states) > 1 and (
            len(self._states) > self.config.cache_states
            or sum(len(v) for v in self._states.values()) > self.config.cache_bytes
        ):
            self._states.popitem(last=False)

    def _load_state(self, key: tuple[int, ...], data: bytes) -> None:
        import ctypes

        import llama_cpp

        if key in self._states:
            self._states.move_to_end(key)
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        llm = self._llm
        if llama_cpp.llama_state_set_data(llm._ctx.ctx, buf, len(data)) != len(data):
            self._states.pop(key, None)
            llm.reset()
            logger.warning("could not restore a cached KV state; evaluating the full prompt")
            return
        llm.input_ids[: len(key)] = key
        llm.n_tokens = len(key)
        llm._requires_eval = True


class _LazyGrammar:
    """A logits processor for greedy grammar-constrained generation: it checks only the top
    token against the grammar and masks the vocabulary only when that token is not allowed.

    It runs first in llama-cpp-python's sampler chain, over the whole vocabulary in token-id
    order, and keeps its own llama.cpp grammar sampler: the tokens generated since its last call
    (the end of ``input_ids``) are accepted into it before the next check.
    """

    def __init__(self, llm: Any, grammar: str) -> None:
        import llama_cpp

        self._lib = llama_cpp
        vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
        self._sampler = llama_cpp.llama_sampler_init_grammar(
            vocab, grammar.encode("utf-8"), b"root"
        )
        if not self._sampler:
            raise ModelError(f"invalid GBNF grammar (llama.cpp cannot parse it): {grammar[:200]!r}")
        self._seen: int | None = None
        self._one = (llama_cpp.llama_token_data * 1)()
        self._one_array = llama_cpp.llama_token_data_array(
            data=self._one, size=1, selected=-1, sorted=False
        )
        self.steps = 0
        self.full_masks = 0
        """Steps whose top token the grammar refused (the whole vocabulary was masked)."""

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import ctypes

        import numpy as np

        lib = self._lib
        n = len(input_ids)
        if self._seen is None:
            self._seen = n  # the prompt
        for token in input_ids[self._seen : n]:
            lib.llama_sampler_accept(self._sampler, int(token))
        self._seen = n
        self.steps += 1
        top = int(np.argmax(scores))
        self._one[0].id, self._one[0].logit, self._one[0].p = top, float(scores[top]), 0.0
        self._one_array.size, self._one_array.selected = 1, -1
        lib.llama_sampler_apply(self._sampler, ctypes.byref(self._one_array))
        if self._one_array.size == 1 and np.isfinite(self._one[0].logit):
            return scores  # allowed: greedy takes it
        self.full_masks += 1
        size = len(scores)
        data = (lib.llama_token_data * size)()
        view = np.ctypeslib.as_array(data)
        view["id"] = np.arange(size, dtype=np.int32)
        view["logit"] = scores
        array = lib.llama_token_data_array(data=data, size=size, selected=-1, sorted=False)
        lib.llama_sampler_apply(self._sampler, ctypes.byref(array))
        masked = np.full(size, -np.inf, dtype=np.float32)
        kept = view[: array.size]
        masked[kept["id"]] = kept["logit"]
        return masked

    def close(self) -> None:
        if self._sampler:
            self._lib.llama_sampler_free(self._sampler)
            self._sampler = None


def _common_prefix(a: Any, b: Any) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
