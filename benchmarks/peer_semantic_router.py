"""The real ``semantic-router`` package as a nearest-example routing peer, offline.

One ``semantic_router.Route`` per label (the KB names plus ``none``) whose utterances are the
training-fold state texts of that label, in a ``semantic_router.IndexedRouter`` over the
package's in-process ``LocalIndex``, embedded by kbrouter's own encoder through a
``DenseEncoder`` subclass (no network service is ever called). Folds are the benchmark's grouped
folds (``kbrouter.routing.router._group_splits``), so the peer sees exactly the same splits as
the learned router.

Scoring is the package's own: the query's ``top_k`` most similar stored utterances are found,
each route scores the mean similarity of its hits among them (0.0 if it has none), and the
best-scoring route is returned if its score reaches the confidence threshold. A state whose
best score is below the threshold gets no route from semantic-router; it then falls back to the
best-scoring route (asked of the same router with the threshold lowered to -inf), and the
fallbacks are counted.

    from peer_semantic_router import semantic_router_decisions
    decisions, facts = semantic_router_decisions(samples, ["text", "image", "table"], 5, enc)
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["DEFAULT_THRESHOLD", "semantic_router_decisions", "state_text"]

# semantic-router 1.x sets no default threshold (None: always return the top route). 0.5 is
# the score_threshold its HuggingFaceEncoder used to default to for all-MiniLM-L6-v2, the
# same model family as kbrouter's packaged MiniLM encoder.
DEFAULT_THRESHOLD = 0.5


def state_text(sample: Any) -> str:
    """The routing state as text: question plus step and history key (as ``_nearest``)."""
    st = sample.state
    return f"{st.question} [step {st.step}; after {' '.join(st.prev_kbs) or '-'}]"


def _encoder_class():
    """A semantic-router ``DenseEncoder`` that looks vectors up, encoding only on a miss."""
    from pydantic import PrivateAttr
    from semantic_router.encoders import DenseEncoder

    class KBRouterDenseEncoder(DenseEncoder):
        type: str = "kbrouter"
        _encoder: Any = PrivateAttr(default=None)
        _cache: dict[str, list[float]] = PrivateAttr(default_factory=dict)

        def __init__(self, encoder: Any, cache: dict[str, list[float]], **kwargs: Any):
            super().__init__(name=str(getattr(encoder, "name", "kbrouter")), **kwargs)
            self._encoder = encoder
            self._cache = cache

        def __call__(self, docs: list[Any]) -> list[list[float]]:
            texts = [str(d) for d in docs]
            missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
            if missing:
                vecs = np.asarray(self._encoder.encode(missing), dtype=np.float32)
                self._cache.update(zip(missing, vecs.tolist(), strict=True))
            return [self._cache[t] for t in texts]

        async def acall(self, docs: list[Any]) -> list[list[float]]:
            return self(docs)

    return KBRouterDenseEncoder


def semantic_router_decisions(
    samples: Sequence[Any],
    kb_names: Sequence[str],
    folds: int,
    encoder: Any,
    seed: int = 0,
    *,
    threshold: float | None = DEFAULT_THRESHOLD,
    top_k: int = 5,
) -> tuple[list, dict]:
    """Route every sample with a semantic-router ``IndexedRouter`` fitted on the other folds.

    Returns one one-hot :class:`~kbrouter.types.RouteDistribution` per sample (sample order)
    and a facts dict. ``threshold`` is semantic-router's ``confidence_threshold`` on the raw
    aggregated cosine (None disables it, so nothing ever falls back); ``top_k`` is its number
    of utterance hits per query (the package default, 5).
    """
    t0 = time.perf_counter()
    try:
        import semantic_router
        from semantic_router import IndexedRouter, Route
        from semantic_router.index import LocalIndex
    except ImportError as e:  # pragma: no cover - the benchmark reports the reason
        raise RuntimeError(f"semantic-router is not importable: {e}") from e

    from kbrouter.routing.router import _group_splits
    from kbrouter.types import NONE_LABEL, RouteDistribution

    labels = [*kb_names, NONE_LABEL]
    y = [s.label for s in samples]
    unknown = sorted(set(y) - set(labels))
    if unknown:
        raise ValueError(f"sample labels outside {labels}: {unknown}")
    texts = [state_text(s) for s in samples]
    splits = _group_splits(y, [s.group for s in samples], folds, seed)

    # embed each distinct text once; the wrapper only looks vectors up
    distinct = list(dict.fromkeys(texts))
    t_embed = time.perf_counter()
    vecs = np.asarray(encoder.encode(distinct), dtype=np.float32)
    embed_seconds = time.perf_counter() - t_embed
    cache = dict(zip(distinct, vecs.tolist(), strict=True))
    sr_encoder = _encoder_class()(encoder, cache)

    chosen: list[str | None] = [None] * len(samples)
    fallbacks = 0
    stored = 0
    for tr, te in splits:
        routes = []
        for lab in labels:
            utts = list(dict.fromkeys(texts[i] for i in tr if y[i] == lab))
            if utts:  # a label absent from this training fold cannot be routed to
                routes.append(Route(name=lab, utterances=utts))
        router = IndexedRouter(
            encoder=sr_encoder,
            routes=routes,
            index=LocalIndex(),
            top_k=top_k,
            confidence_threshold=threshold,
        )
        stored += len(router.index)
        for i in te:
            pick = router(texts[i])
            name = pick.name
            if name is None:  # below the threshold: take the best-scoring route
                fallbacks += 1
                name = router(texts[i], limit=1, threshold=float("-inf")).name
            chosen[i] = name if name is not None else NONE_LABEL

    decisions = []
    for name in chosen:
        assert name is not None, "every sample is in exactly one test fold"
        decisions.append(
            RouteDistribution(
                probs={lab: 1.0 if lab == name else 0.0 for lab in labels},
                label=name,
                confidence=1.0,
            )
        )
    facts = {
        "package": "semantic-router",
        "semantic_router_version": semantic_router.__version__,
        "router": "semantic_router.IndexedRouter + LocalIndex (in-process numpy)",
        "encoder": str(getattr(encoder, "name", type(encoder).__name__)),
        "dim": int(vecs.shape[1]) if vecs.ndim == 2 else None,
        "threshold": threshold,
        "top_k": top_k,
        "aggregation": "mean",
        "folds": len(splits),
        "seed": seed,
        "n": len(samples),
        "distinct_texts": len(distinct),
        "stored_utterances_per_fold_mean": stored / len(splits),
        "fallbacks": fallbacks,
        "fallback_rate": fallbacks / len(samples) if samples else 0.0,
        "embed_seconds": round(embed_seconds, 3),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return decisions, facts
