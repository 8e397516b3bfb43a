"""The chat-model interface every backend implements."""

from __future__ import annotations

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
