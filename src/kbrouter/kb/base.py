"""The knowledge-base interface every KB implements and every upper layer uses."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from kbrouter.types import Evidence, KBInfo, Modality, Query

__all__ = ["KBInfo", "KnowledgeBase"]  # KBInfo lives in the shared vocabulary (types.py)


class KnowledgeBase(ABC):
    """A searchable, persisted knowledge base.

    ``search`` is batched: one call takes many queries and returns one ranked evidence list per
    query (best first, at most ``k`` items). Implementations are thread-safe for concurrent
    ``search`` calls (the engine calls them from worker threads).
    """

    info: KBInfo

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def modality(self) -> Modality:
        return self.info.modality

    @abstractmethod
    def search(self, queries: Sequence[Query], k: int | None = None) -> list[list[Evidence]]:
        """Return the top-``k`` evidence for each query (``k`` defaults to the KB's config)."""

    def fetch(self, doc_ids: Sequence[str]) -> list[list[Evidence]]:
        """The indexed items of each source document (passage, image or table id, as in the
        source file), in index order, with score 1.0; an unknown id gives an empty list.

        Used to show a model exactly the gold evidence (the ``oracle-evidence`` bound).
        """
        raise NotImplementedError(f"KB {self.name!r} ({type(self).__name__}) cannot fetch by id")

    def __len__(self) -> int:  # number of indexed items (chunks)
        raise NotImplementedError
