"""The learned router: a millisecond classifier that decides, at every step, retrieve-or-stop
and which KB, without an LLM call.

- :mod:`~kbrouter.routing.data`: routing samples (a state and its label) and the resolution of
  KB labels against the user's KBs; ``kbrouter.train.router`` builds them from datasets with
  gold KBs in hop order and from step samples (both step formats);
- :mod:`~kbrouter.routing.features`: question / sub-question embeddings (any
  sentence-transformers model) plus step, image and history features;
- :mod:`~kbrouter.routing.router`: :class:`LearnedRouter` (scikit-learn classifier, calibrated
  probabilities, abstain and confidence thresholds fitted on held-out data), fit / save / load
  with a manifest;
- :mod:`~kbrouter.routing.metrics`: routing accuracy, abstain precision/recall, calibration.

This package imports only ``types``, ``errors``, ``kb.base`` (KB descriptions) and
``encoders``; policies use it, ``train`` fits it, ``eval`` reports on it.
"""

from kbrouter.routing.data import LabelResolver, RouteSample, gold_path_samples
from kbrouter.routing.router import LearnedRouter, RouterConfig, fit_router

__all__ = [
    "LabelResolver",
    "LearnedRouter",
    "RouteSample",
    "RouterConfig",
    "fit_router",
    "gold_path_samples",
]
