"""The learned router: embeddings + a scikit-learn classifier with calibrated probabilities.

Fitting (:func:`fit_router`):

1. Held-out predictions: with ``cv_folds >= 2``, out-of-fold probabilities from K grouped,
   label-stratified folds (the states of one question never straddle folds); otherwise one
   seeded, grouped, stratified train/validation split (``val_fraction``).
2. On those held-out probabilities: the **abstain threshold** (say ``none`` when
   ``P(none) >= t``; ``t`` maximises the balanced accuracy of stop-vs-retrieve) and the
   **confidence threshold** (the smallest confidence at which held-out decisions reach
   ``target_precision``; hybrid routing overrides the LLM only above it). Held-out metrics are
   recorded in the manifest.
3. The saved model: with cross-validation, refitted on all samples; with a validation split,
   the model trained on the training part (so its recorded metrics are its own).

Every classifier is a pipeline (standard scaling, then logistic regression or a one-layer MLP)
wrapped in :class:`~sklearn.calibration.CalibratedClassifierCV` (temperature scaling by default)
whose calibration folds are grouped by question as well.

A saved router is a folder: ``manifest.json`` (label set, KB names, encoder spec, name and
dimension, feature version, thresholds, metrics, training-data hash and counts, library
versions, the model file's sha256) and ``model.joblib``. Loading checks the checksum, the
encoder and (when given) the configured KB names, and says exactly what does not match.
joblib files are pickles: load only routers you trust.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from kbrouter.encoders.base import TextEncoder
from kbrouter.errors import RouterError
from kbrouter.files import file_sha256
from kbrouter.routing.data import RouteSample, samples_hash
from kbrouter.routing.features import FEATURE_VERSION, RouteFeaturizer
from kbrouter.routing.metrics import routing_scores
from kbrouter.types import NONE_LABEL, RouteDistribution, RouteState

log = logging.getLogger(__name__)

__all__ = ["LearnedRouter", "RouterConfig", "cross_val_probs", "fit_router"]

MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.joblib"
FORMAT = "kbrouter-learned-router"
FORMAT_VERSION = 1


class RouterConfig(BaseModel):
    """How a learned router is built and fitted (recorded in its manifest)."""

    model_config = ConfigDict(extra="forbid")

    encoder: str = Field("minilm", description="Text encoder: 'minilm' or any ST model / folder.")
    classifier: Literal["logreg", "mlp"] = Field("logreg", description="The scikit-learn model.")
    C: float = Field(0.1, gt=0, description="Inverse L2 strength of logistic regression.")
    hidden_units: int = Field(128, gt=0, description="Hidden layer width of the MLP.")
    mlp_alpha: float = Field(1e-3, ge=0, description="L2 penalty of the MLP.")
    calibration: Literal["temperature", "sigmoid", "isotonic", "none"] = Field(
        "temperature", description="Probability calibration (CalibratedClassifierCV method)."
    )
    calibration_folds: int = Field(3, ge=2, description="Grouped folds of the calibration fit.")
    val_fraction: float = Field(
        0.2, gt=0, lt=1, description="Held-out share when not cross-validating."
    )
    cv_folds: int = Field(0, ge=0, description="K-fold cross-validation (0: one val split).")
    target_precision: float = Field(
        0.95, gt=0, le=1, description="Held-out precision the confidence threshold must reach."
    )
    max_step: int = Field(3, ge=1, description="Steps from here on share one feature bucket.")
    lexical_dim: int = Field(
        1024, ge=0, description="Hashed word n-gram buckets of the question (0: embeddings only)."
    )
    seed: int = Field(0, description="Seed of splits and of the MLP.")


# --------------------------------------------------------------------------- estimator


def _estimator(cfg: RouterConfig, calib_splits: Any) -> Any:
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if cfg.classifier == "logreg":
        base = LogisticRegression(C=cfg.C, max_iter=5000)
    else:
        base = MLPClassifier(
            hidden_layer_sizes=(cfg.hidden_units,),
            alpha=cfg.mlp_alpha,
            max_iter=400,
            random_state=cfg.seed,
        )
    pipe = make_pipeline(StandardScaler(), base)
    if cfg.calibration == "none" or calib_splits is None:
        return pipe
    return CalibratedClassifierCV(pipe, method=cfg.calibration, cv=calib_splits, ensemble=False)


def _group_splits(
    y: Sequence[str], groups: Sequence[str], n_splits: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Grouped, label-stratified folds (as many as the groups allow, at least 2)."""
    from sklearn.model_selection import StratifiedGroupKFold

    n_groups = len(set(groups))
    k = min(n_splits, n_groups)
    if k < 2:
        raise RouterError(f"need samples from at least 2 questions to split, got {n_groups}")
    sgkf = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # rare labels: fewer members than folds
        warnings.simplefilter("ignore", UserWarning)
        return [(tr, te) for tr, te in sgkf.split(np.zeros(len(y)), list(y), list(groups))]


def _fit_estimator(
    cfg: RouterConfig, x: np.ndarray, y: Sequence[str], groups: Sequence[str]
) -> Any:
    calib = None
    if cfg.calibration != "none" and len(set(groups)) >= 2:
        calib = _group_splits(y, groups, cfg.calibration_folds, cfg.seed + 1)
        # a calibration fold must see every class in training, else fall back to no folds
        ys = np.asarray(y)
        if any(len(set(ys[tr])) < len(set(ys)) for tr, _ in calib):
            log.warning("a class is too rare for grouped calibration folds; using stratified folds")
            calib = cfg.calibration_folds
    est = _estimator(cfg, calib)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        try:
            est.fit(x, np.asarray(y))
        except ValueError as e:
            raise RouterError(f"cannot fit the router classifier: {e}") from None
    return est


def _full_probs(est: Any, x: np.ndarray, labels: Sequence[str]) -> np.ndarray:
    """Probabilities in ``labels`` order (0 for labels the estimator never saw)."""
    p = est.predict_proba(x)
    out = np.zeros((x.shape[0], len(labels)), dtype=np.float64)
    pos = {lab: i for i, lab in enumerate(labels)}
    for j, cls in enumerate(est.classes_):
        out[:, pos[str(cls)]] = p[:, j]
    return out


# --------------------------------------------------------------------------- decisions


def _decide(probs: np.ndarray, labels: Sequence[str], none_threshold: float) -> tuple[str, float]:
    i_none = labels.index(NONE_LABEL)
    if probs[i_none] >= none_threshold:
        return NONE_LABEL, float(probs[i_none])
    kb_probs = probs.copy()
    kb_probs[i_none] = -1.0
    j = int(np.argmax(kb_probs))
    return labels[j], float(probs[j])


def _fit_none_threshold(p_none: np.ndarray, is_none: np.ndarray) -> float:
    """The P(none) cut that maximises balanced accuracy of stop-vs-retrieve (ties: nearest 0.5)."""
    if is_none.all() or not is_none.any():
        return 0.5
    cands = np.unique(np.concatenate([p_none, [0.5]]))
    best, best_key = 0.5, (-1.0, 0.0)
    for t in cands:
        stop = p_none >= t
        tpr = (stop & is_none).sum() / is_none.sum()
        tnr = (~stop & ~is_none).sum() / (~is_none).sum()
        key = ((tpr + tnr) / 2, -abs(t - 0.5))
        if key > best_key:
            best, best_key = float(t), key
    return best


def _fit_confidence_threshold(
    correct: np.ndarray, conf: np.ndarray, target: float
) -> tuple[float, float | None]:
    """Smallest confidence whose decisions at or above it reach ``target`` precision.

    Returns (threshold, held-out coverage at it); 1.0 and None if no cut reaches the target.
    """
    for t in np.unique(conf):
        m = conf >= t
        if m.any() and correct[m].mean() >= target:
            return float(t), float(m.mean())
    return 1.0, None


# --------------------------------------------------------------------------- the router


class LearnedRouter:
    """A fitted router: ``predict(states)`` gives one calibrated distribution per state.

    Build one with :func:`fit_router` or :meth:`load`.
    """

    def __init__(
        self,
        featurizer: RouteFeaturizer,
        estimator: Any,
        *,
        none_threshold: float,
        confidence_threshold: float,
        manifest: dict[str, Any],
    ) -> None:
        self.featurizer = featurizer
        self.estimator = estimator
        self.none_threshold = none_threshold
        self.confidence_threshold = confidence_threshold
        self.manifest = manifest

    @property
    def kb_names(self) -> list[str]:
        return list(self.featurizer.kb_names)

    @property
    def labels(self) -> list[str]:
        """KB names in config order, then ``none``."""
        return [*self.featurizer.kb_names, NONE_LABEL]

    def predict_proba(self, states: Sequence[RouteState]) -> np.ndarray:
        """(n, len(labels)) calibrated probabilities."""
        if not states:
            return np.zeros((0, len(self.labels)))
        return _full_probs(self.estimator, self.featurizer.transform(states), self.labels)

    def distributions(self, probs: np.ndarray) -> list[RouteDistribution]:
        labels = self.labels
        out = []
        for row in probs:
            label, conf = _decide(row, labels, self.none_threshold)
            out.append(
                RouteDistribution(
                    probs={lab: round(float(p), 6) for lab, p in zip(labels, row, strict=True)},
                    label=label,
                    confidence=conf,
                )
            )
        return out

    def predict(self, states: Sequence[RouteState]) -> list[RouteDistribution]:
        """One decision per state: ``label`` after the abstain threshold, its confidence."""
        return self.distributions(self.predict_proba(states))

    def route(self, state: RouteState) -> RouteDistribution:
        return self.predict([state])[0]

    def is_confident(self, dist: RouteDistribution) -> bool:
        """Whether ``dist``'s decision clears the confidence threshold fitted on held-out data."""
        return dist.confidence >= self.confidence_threshold

    # ---------------------------------------------------------------- persistence

    def save(self, path: str | Path) -> Path:
        """Write the router folder atomically (a temporary folder, then renamed into place)."""
        import joblib

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        try:
            joblib.dump(self.estimator, tmp / MODEL_FILE)
            manifest = {**self.manifest, "model_sha256": file_sha256(tmp / MODEL_FILE)}
            (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", "utf-8")
            if path.exists():
                old = path.with_name(f".{path.name}.old-{os.getpid()}")
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        self.manifest = manifest
        return path

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        encoder: TextEncoder | None = None,
        kb_names: Sequence[str] | None = None,
    ) -> LearnedRouter:
        """Load a saved router.

        Args:
            encoder: use this encoder (must have the recorded name and dimension); default:
                load the recorded encoder spec.
            kb_names: the configured KB names; the router's label set must be the same.

        Raises:
            RouterError: missing or corrupt files, another format, an encoder or KB-name
                mismatch.
        """
        import joblib

        path = Path(path)
        manifest = read_manifest(path)
        model_file = path / MODEL_FILE
        if not model_file.is_file():
            raise RouterError(f"router folder {path} has no {MODEL_FILE}")
        if manifest.get("model_sha256") != file_sha256(model_file):
            raise RouterError(
                f"{model_file} does not match the checksum in its manifest (corrupt or replaced)"
            )
        saved_kbs = list(manifest["kb_names"])
        if kb_names is not None and set(kb_names) != set(saved_kbs):
            missing = [k for k in saved_kbs if k not in kb_names]
            extra = [k for k in kb_names if k not in saved_kbs]
            detail = []
            if missing:
                detail.append(f"not configured: {', '.join(missing)}")
            if extra:
                detail.append(f"not known to the router: {', '.join(extra)}")
            raise RouterError(
                f"router {path} was trained for KBs {saved_kbs}, but the configured KBs are "
                f"{list(kb_names)} ({'; '.join(detail)}); retrain it on these KBs"
            )
        enc_info = manifest["encoder"]
        if encoder is None:
            from kbrouter.encoders.text import load_text_encoder

            encoder = load_text_encoder(enc_info["spec"])
        if encoder.name != enc_info["name"] or int(encoder.dim) != int(enc_info["dim"]):
            raise RouterError(
                f"router {path} was trained with encoder {enc_info['name']!r} "
                f"({enc_info['dim']}-d), not {encoder.name!r} ({encoder.dim}-d)"
            )
        try:
            estimator = joblib.load(model_file)
        except Exception as e:  # pickles fail in many ways; name the file
            raise RouterError(f"cannot load {model_file}: {e}") from None
        feat = RouteFeaturizer(
            encoder,
            saved_kbs,
            max_step=int(manifest["max_step"]),
            lexical_dim=int(manifest["config"].get("lexical_dim", 0)),
        )
        thr = manifest["thresholds"]
        return cls(
            feat,
            estimator,
            none_threshold=float(thr["none"]),
            confidence_threshold=float(thr["confidence"]),
            manifest=manifest,
        )


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a saved router folder (RouterError if missing or not a router)."""
    path = Path(path)
    f = path / MANIFEST_FILE
    if not f.is_file():
        raise RouterError(f"{path} is not a saved router (no {MANIFEST_FILE})")
    try:
        manifest = json.loads(f.read_text("utf-8"))
    except ValueError as e:
        raise RouterError(f"{f} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise RouterError(f"{f} is not a kbrouter learned-router manifest")
    if int(manifest.get("format_version", 0)) > FORMAT_VERSION:
        raise RouterError(
            f"{f} has format version {manifest.get('format_version')}, newer "
            f"than this kbrouter reads ({FORMAT_VERSION}); upgrade kbrouter"
        )
    if int(manifest.get("feature_version", -1)) != FEATURE_VERSION:
        raise RouterError(
            f"{f} uses feature version {manifest.get('feature_version')}; this kbrouter computes "
            f"version {FEATURE_VERSION}: retrain the router"
        )
    return manifest


def _versions() -> dict[str, str]:
    out = {}
    for lib in ("scikit-learn", "numpy", "sentence-transformers"):
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            continue
    return out


# --------------------------------------------------------------------------- fitting


def _check_samples(samples: Sequence[RouteSample], kb_names: Sequence[str]) -> None:
    if not samples:
        raise RouterError("no routing samples to train on (empty training data)")
    labels = {*kb_names, NONE_LABEL}
    unknown = sorted({s.label for s in samples if s.label not in labels})
    if unknown:
        raise RouterError(
            f"training labels {unknown} are not configured KB names or 'none' "
            f"(configured: {', '.join(kb_names)})"
        )
    seen = {s.label for s in samples}
    if len(seen) < 2:
        raise RouterError(
            f"training data has a single label ({next(iter(seen))!r}); a router needs at least "
            "two (e.g. KBs and 'none')"
        )


def cross_val_probs(
    samples: Sequence[RouteSample],
    kb_names: Sequence[str],
    config: RouterConfig | None = None,
    *,
    encoder: TextEncoder | None = None,
    features: np.ndarray | None = None,
) -> tuple[np.ndarray, list[int]]:
    """Out-of-fold probabilities (``len(kb_names) + 1`` columns) and each sample's fold.

    Uses ``config.cv_folds`` grouped stratified folds (5 when it is 0).
    """
    cfg = config or RouterConfig()
    _check_samples(samples, kb_names)
    labels = [*kb_names, NONE_LABEL]
    if features is None:
        feat = RouteFeaturizer(
            _encoder(cfg, encoder), kb_names, max_step=cfg.max_step, lexical_dim=cfg.lexical_dim
        )
        features = feat.transform([s.state for s in samples])
    y = [s.label for s in samples]
    groups = [s.group for s in samples]
    k = cfg.cv_folds if cfg.cv_folds >= 2 else 5
    probs = np.zeros((len(samples), len(labels)))
    fold_of = [0] * len(samples)
    for f, (tr, te) in enumerate(_group_splits(y, groups, k, cfg.seed)):
        est = _fit_estimator(cfg, features[tr], [y[i] for i in tr], [groups[i] for i in tr])
        probs[te] = _full_probs(est, features[te], labels)
        for i in te:
            fold_of[i] = f
    return probs, fold_of


def _encoder(cfg: RouterConfig, encoder: TextEncoder | None) -> TextEncoder:
    if encoder is not None:
        return encoder
    from kbrouter.encoders.text import load_text_encoder

    return load_text_encoder(cfg.encoder)


def fit_router(
    samples: Sequence[RouteSample],
    kb_names: Sequence[str],
    config: RouterConfig | None = None,
    *,
    encoder: TextEncoder | None = None,
    data_facts: dict[str, Any] | None = None,
) -> LearnedRouter:
    """Fit a router on ``samples`` whose labels are ``kb_names`` or ``none`` (module docstring).

    Raises:
        RouterError: empty data, a single label, labels that are not configured KBs.
    """
    cfg = config or RouterConfig()
    kb_names = list(kb_names)
    if NONE_LABEL in kb_names:
        raise RouterError(f"{NONE_LABEL!r} is reserved and cannot be a KB name")
    _check_samples(samples, kb_names)
    enc = _encoder(cfg, encoder)
    feat = RouteFeaturizer(enc, kb_names, max_step=cfg.max_step, lexical_dim=cfg.lexical_dim)
    labels = [*kb_names, NONE_LABEL]
    t0 = time.perf_counter()
    x = feat.transform([s.state for s in samples])
    embed_s = time.perf_counter() - t0
    y = [s.label for s in samples]
    groups = [s.group for s in samples]

    if cfg.cv_folds >= 2:
        held_probs, _ = cross_val_probs(samples, kb_names, cfg, features=x)
        held_idx = np.arange(len(samples))
        est = _fit_estimator(cfg, x, y, groups)
        heldout = f"{cfg.cv_folds}-fold grouped cross-validation (out-of-fold predictions)"
        trained_on = len(samples)
    else:
        k = max(2, round(1 / cfg.val_fraction))
        tr, te = _group_splits(y, groups, k, cfg.seed)[0]
        est = _fit_estimator(cfg, x[tr], [y[i] for i in tr], [groups[i] for i in tr])
        held_probs = _full_probs(est, x[te], labels)
        held_idx = te
        heldout = f"grouped stratified validation split ({len(te)} of {len(samples)} samples)"
        trained_on = len(tr)

    i_none = labels.index(NONE_LABEL)
    held_gold = np.asarray([y[i] for i in held_idx])
    none_t = _fit_none_threshold(held_probs[:, i_none], held_gold == NONE_LABEL)
    decisions = [_decide(row, labels, none_t) for row in held_probs]
    preds = [d[0] for d in decisions]
    conf = np.asarray([d[1] for d in decisions])
    correct = np.asarray([p == g for p, g in zip(preds, held_gold, strict=True)])
    conf_t, coverage = _fit_confidence_threshold(correct, conf, cfg.target_precision)
    scores = routing_scores(
        list(held_gold), preds, list(conf), [samples[i].state.step for i in held_idx], labels
    )
    metrics = {
        k: scores[k]
        for k in ("n", "accuracy", "hop1_accuracy", "abstain_precision", "abstain_recall", "ece")
    }
    metrics["confident_coverage"] = coverage
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "labels": labels,
        "kb_names": kb_names,
        "trained_labels": sorted(set(y)),
        "encoder": {"spec": cfg.encoder, "name": enc.name, "dim": int(enc.dim)},
        "feature_version": FEATURE_VERSION,
        "feature_dim": feat.dim,
        "max_step": cfg.max_step,
        "config": cfg.model_dump(),
        "thresholds": {"none": none_t, "confidence": conf_t},
        "heldout": heldout,
        "metrics": metrics,
        "data": {
            "samples": len(samples),
            "trained_on": trained_on,
            "groups": len(set(groups)),
            "sha256": samples_hash(samples),
            "labels": dict(Counter(y)),
            "origins": dict(Counter(s.origin for s in samples)),
            **(data_facts or {}),
        },
        "embed_seconds": round(embed_s, 2),
        "libraries": _versions(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return LearnedRouter(
        feat, est, none_threshold=none_t, confidence_threshold=conf_t, manifest=manifest
    )
