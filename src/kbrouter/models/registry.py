"""Build a chat backend from a one-line spec.

Spec forms:

``llama-cpp``
    The embedded default: Qwen2.5-Coder-0.5B-Instruct Q4_K_M run in-process by llama-cpp-python
    (assembled once from the packaged parts, see :mod:`kbrouter.models.gguf`).
``llama-cpp:<preset>`` / ``llama-cpp:<path/to/model.gguf>``
    A packaged preset (``qwen2.5-coder-0.5b``, ``qwen2.5-coder-1.5b``, ``smollm2-135m``) or any
    local GGUF file, run in-process.
``openai:<model>@<base_url>``
    An OpenAI-compatible server (vLLM, SGLang, Ollama, llama.cpp server, OpenAI), e.g.
    ``openai:Qwen/Qwen2.5-VL-7B-Instruct@http://gpu:8000/v1``.
``openai:<model>``
    Same, base URL from ``KBROUTER_OPENAI_BASE_URL`` / ``OPENAI_BASE_URL`` (default OpenAI's);
    the API key always comes from arguments or ``KBROUTER_OPENAI_API_KEY`` / ``OPENAI_API_KEY``.
``transformers:<path or hub id>``
    A Hugging Face chat model (local checkpoint dir, hub id, or a ``.gguf`` file) run in-process
    with transformers; vision-language models get the image.

Backend settings ride along after ``;`` as ``key=value`` pairs (values are JSON when they parse,
else text), so the CLI can reach them, e.g. ``openai:Qwen/Qwen2.5-VL-7B-Instruct@http://gpu:8000/v1;
vision=true;grammar_mode=vllm`` or ``llama-cpp:qwen2.5-coder-1.5b;n_ctx=8192``. Keyword arguments
of :func:`load_model` are passed to the backend's constructor too and win over the spec's.
"""

from __future__ import annotations

import json
from typing import Any

from kbrouter.errors import ConfigError
from kbrouter.models.base import ChatModel

SPEC_FORMS = (
    "llama-cpp",
    "llama-cpp:<preset or path.gguf>",
    "openai:<model>@<base_url>",
    "openai:<model>",
    "transformers:<path or hub id>",
)


def split_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"<kind>:<arg>;key=value;..."`` -> (``"<kind>:<arg>"``, settings)."""
    base, *items = spec.split(";")
    options: dict[str, Any] = {}
    for item in (i.strip() for i in items):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"model spec {spec!r}: setting {item!r} is not key=value")
        try:
            options[key.strip()] = json.loads(value)
        except ValueError:
            options[key.strip()] = value.strip()
    return base.strip(), options


def load_model(spec: str, **kw: Any) -> ChatModel:
    """Instantiate the chat backend described by ``spec`` (see the module docstring)."""
    spec, options = split_spec(spec)
    kw = {**options, **kw}
    kind, _, arg = spec.strip().partition(":")
    kind = kind.strip().lower().replace("_", "-")
    arg = arg.strip()
    if kind in ("llama-cpp", "llamacpp", "llama.cpp"):
        from kbrouter.models.llama_cpp import LlamaCppModel

        return LlamaCppModel(arg or None, **kw)
    if kind == "openai":
        from kbrouter.models.openai_compat import OpenAICompatibleModel

        model, base_url = _split_openai(arg)
        return OpenAICompatibleModel(model or None, base_url=base_url or None, **kw)
    if kind in ("transformers", "hf"):
        if not arg:
            raise ConfigError(
                f"model spec {spec!r} needs a path or hub id: transformers:<path or id>"
            )
        from kbrouter.models.transformers_backend import TransformersModel

        return TransformersModel(arg, **kw)
    raise ConfigError(f"unknown model spec {spec!r}; expected one of: {', '.join(SPEC_FORMS)}")


def _split_openai(arg: str) -> tuple[str, str]:
    """``model@url`` -> (model, url); the URL part starts at the last ``@http``."""
    for marker in ("@https://", "@http://"):
        i = arg.rfind(marker)
        if i >= 0:
            return arg[:i], arg[i + 1 :]
    if "@" in arg:
        model, _, url = arg.rpartition("@")
        return model, url if "://" in url else f"http://{url}"
    return arg, ""
