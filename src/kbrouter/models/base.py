"""The chat-model interface every backend implements."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod

from kbrouter.types import ChatMessage, ChatResult, SamplingParams


class ChatModel(ABC):
    """An async chat backend.

    ``chat`` must be safe to call concurrently from many asyncio tasks (backends that cannot
    run requests in parallel serialise them internally). Failures raise
    :class:`~kbrouter.errors.ModelError` with a message naming the backend and the cause.
    """

    name: str = "model"
    supports_images: bool = False
    """True if image parts are shown to the model; text-only models get a note instead."""
    supports_grammar: bool = False
    """True if ``SamplingParams.grammar`` (GBNF) is enforced."""
    context_window: int | None = None

    @property
    def prompt_variant(self) -> str | None:
        """The router prompt variant this model was fine-tuned with (``compact`` for a router
        exported by ``kbrouter train export``), or None for a model that was not: policies
        whose ``router_prompt`` is ``auto`` use it."""
        return None

    @abstractmethod
    async def chat(
        self, messages: list[ChatMessage], params: SamplingParams | None = None
    ) -> ChatResult:
        """Generate one assistant reply."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook, default does nothing
        """Release resources (HTTP clients, model memory)."""

    def describe(self) -> dict:
        """Config facts recorded in trajectories and results directories."""
        return {"backend": type(self).__name__, "name": self.name}

    def identity(self) -> dict:
        """What determines this model's outputs, by content where the backend can tell (a
        GGUF's or checkpoint's sha256) plus the settings that change outputs, and nothing
        machine-specific (paths, thread counts). The replay cache keys on it and an eval's
        resume check compares it. Default: the backend and the model name."""
        return {"backend": type(self).__name__, "name": self.name}


class PerLoopLock:
    """One :class:`asyncio.Lock` per running event loop.

    A model object can outlive one ``asyncio.run`` (the CLI and tests call the sync wrappers
    several times); an asyncio lock is bound to the loop that first used it, so in-process
    backends that must serialise generation keep one lock per live loop.
    """

    def __init__(self) -> None:
        self._locks: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Lock]] = {}

    def get(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        entry = self._locks.get(id(loop))
        if entry is None or entry[0] is not loop:
            self._locks = {k: v for k, v in self._locks.items() if not v[0].is_closed()}
            entry = self._locks[id(loop)] = (loop, asyncio.Lock())
        return entry[1]
