"""Export a trained checkpoint as a GGUF file that llama.cpp (the embedded backend) runs.

``export_gguf(checkpoint, out, quant="q4_k_m")``:

1. **merge**: a LoRA run's adapter (``<checkpoint>/adapter``) is merged into a fresh copy of the
   base model named in the run's ``kbrouter_train.json``; a full checkpoint is used as it is;
2. **convert**: llama.cpp's own converter (``convert_hf_to_gguf.py``) writes an F16 GGUF;
3. **quantise**: llama.cpp's quantiser (``llama_model_quantize`` in llama-cpp-python's
   bindings) writes ``quant`` (``f16`` keeps the conversion);
4. **record**: the ``kbrouter.router_prompt`` metadata key (the prompt variant the model was
   trained with, so ``router_prompt="auto"`` policies use it) and ``kbrouter.manifest`` (base
   model, run, merge, quantisation, versions) are added with the ``gguf`` package's writer.

The converter is not a Python package: it ships in the llama.cpp sources. They are found at
``llama_cpp_dir``, else ``$KBROUTER_LLAMA_CPP``, else in the kbrouter cache, where they are
unpacked once from the llama-cpp-python source distribution of the installed version (fetched
from the package index with ``pip download``, the same archive pip builds the backend from).

Every file is written to a temporary name in the output folder and renamed when complete, so an
interrupted export leaves no half-written GGUF behind.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from importlib import metadata as importlib_metadata
from pathlib import Path

from kbrouter.errors import ConfigError, ModelError
from kbrouter.train.run import read_run_info

logger = logging.getLogger(__name__)

LLAMA_CPP_ENV = "KBROUTER_LLAMA_CPP"
"""Environment variable: a llama.cpp source folder holding ``convert_hf_to_gguf.py``."""

QUANT_TYPES = ("f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0")
"""Quantisation types ``export_gguf`` accepts (llama.cpp's names, lower case)."""

_CONVERTER_FILES = ("convert_hf_to_gguf.py", "conversion", "gguf-py")


def llama_cpp_version() -> str:
    try:
        return importlib_metadata.version("llama_cpp_python")
    except importlib_metadata.PackageNotFoundError as e:
        raise ConfigError(
            "exporting a GGUF needs llama-cpp-python (the llm extra): pip install 'kbrouter[llm]'"
        ) from e


def _cache_root() -> Path:
    from kbrouter.models.gguf import default_cache_dir

    return default_cache_dir().parent / "llama.cpp"


def find_converter(llama_cpp_dir: str | Path | None = None, *, fetch: bool = True) -> Path:
    """The ``convert_hf_to_gguf.py`` of a llama.cpp source folder (see the module docstring).

    Raises :class:`~kbrouter.errors.ConfigError` naming what is missing."""
    given = llama_cpp_dir or os.environ.get(LLAMA_CPP_ENV)
    if given:
        script = Path(given).expanduser() / "convert_hf_to_gguf.py"
        if not script.is_file():
            raise ConfigError(f"no convert_hf_to_gguf.py in the llama.cpp folder {given}")
        return script
    version = llama_cpp_version()
    folder = _cache_root() / version
    script = folder / "convert_hf_to_gguf.py"
    if script.is_file() and (folder / ".complete").is_file():
        return script
    if not fetch:
        raise ConfigError(
            f"llama.cpp's converter is not in {folder}; pass llama_cpp_dir or set {LLAMA_CPP_ENV}"
        )
    _fetch_sources(version, folder)
    return script


def _fetch_sources(version: str, folder: Path) -> None:
    """Unpack the converter files of llama-cpp-python ``version``'s sdist into ``folder``."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            f"llama-cpp-python=={version}",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--quiet",
            "-d",
            tmp,
        ]
        logger.info("fetching llama.cpp's converter: %s", " ".join(cmd))
        done = subprocess.run(cmd, capture_output=True, text=True)
        archives = sorted(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if done.returncode != 0 or not archives:
            raise ConfigError(
                f"could not download the llama-cpp-python {version} sources for llama.cpp's "
                f"converter ({done.stderr.strip()[-300:] or 'no archive'}); pass llama_cpp_dir "
                f"or set {LLAMA_CPP_ENV} to a llama.cpp checkout"
            )
        staged = Path(tmp) / "llama.cpp"
        prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
        with tarfile.open(archives[0]) as tar:
            members = [
                m
                for m in tar.getmembers()
                if m.name.startswith(prefix)
                and m.name[len(prefix) :].split("/", 1)[0] in _CONVERTER_FILES
                and (m.isfile() or m.isdir())
            ]
            for m in members:
                m.name = m.name[len(prefix) :]
            tar.extractall(staged, members=members, filter="data")
        if not (staged / "convert_hf_to_gguf.py").is_file():
            raise ConfigError(f"{archives[0].name} has no vendor/llama.cpp/convert_hf_to_gguf.py")
        (staged / ".complete").write_text(version)
        if folder.exists():
            shutil.rmtree(folder)
        staged.rename(folder)


def merged_folder(checkpoint: str | Path, work: Path, base_model: str | None = None) -> Path:
    """An HF folder with full weights for ``checkpoint``: the checkpoint itself when it has
    them, else its LoRA adapter merged into the base model (written to ``work/merged``)."""
    from kbrouter.train.modeling import merge_lora_run

    return merge_lora_run(checkpoint, work / "merged", base_model)


def _convert(hf_dir: Path, out: Path, converter: Path) -> None:
    cmd = [
        sys.executable,
        str(converter),
        str(hf_dir),
        "--outfile",
        str(out),
        "--outtype",
        "f16",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0 or not out.is_file():
        tail = (done.stderr or done.stdout).strip().splitlines()[-8:]
        raise ModelError("llama.cpp's converter failed:\n" + "\n".join(tail))


def _quantize(src: Path, dst: Path, quant: str, threads: int | None) -> None:
    import llama_cpp

    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant.upper()}", None)
    if ftype is None:
        raise ConfigError(f"llama.cpp has no quantisation type {quant!r}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads or 0
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0 or not dst.is_file():
        raise ModelError(f"llama.cpp could not quantise {src.name} to {quant} (code {rc})")


def _add_metadata(src: Path, dst: Path, entries: dict[str, str]) -> None:
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    reader = gguf.GGUFReader(str(src), "r")
    arch_field = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    if arch_field is None:
        raise ModelError(f"{src} has no {gguf.Keys.General.ARCHITECTURE} key")
    writer = gguf.GGUFWriter(str(dst), arch=arch_field.contents(), endianess=reader.endianess)
    details = {
        k: MetadataDetails(gguf.GGUFValueType.STRING, v, description="kbrouter")
        for k, v in entries.items()
    }
    copy_with_new_metadata(reader, writer, details, remove_metadata=[])


def export_gguf(
    checkpoint: str | Path,
    out: str | Path,
    *,
    quant: str = "q4_k_m",
    router_prompt: str | None = "auto",
    base_model: str | None = None,
    llama_cpp_dir: str | Path | None = None,
    threads: int | None = None,
) -> Path:
    """Write ``checkpoint`` as a llama.cpp GGUF at ``out`` (see the module docstring).

    Args:
        checkpoint: a training run's final folder (LoRA adapter or full weights).
        out: the GGUF file to write.
        quant: one of :data:`QUANT_TYPES`.
        router_prompt: the router prompt variant the model was trained with (recorded as
            ``kbrouter.router_prompt``): ``auto`` takes the one the training run recorded
            (``router_prompt`` in its ``kbrouter_train.json``, written by SFT from its router
            samples) and is an error when the run recorded none or a mix; None records none.
        base_model: the base model of a LoRA run (default: the one its run info names).
        llama_cpp_dir: a llama.cpp source folder with the converter (see :func:`find_converter`).
        threads: quantisation threads (default: all cores).
    """
    from kbrouter.models.gguf import MANIFEST_KEY, ROUTER_PROMPT_KEY
    from kbrouter.policies.prompts import ROUTER_PROMPTS

    quant = quant.lower()
    if quant not in QUANT_TYPES:
        raise ConfigError(f"unknown quantisation {quant!r}; expected one of {QUANT_TYPES}")
    if router_prompt not in (None, "auto", *ROUTER_PROMPTS):
        raise ConfigError(
            f"unknown router prompt {router_prompt!r}; expected auto or one of {ROUTER_PROMPTS}"
        )
    checkpoint = Path(checkpoint)
    out = Path(out)
    if not checkpoint.is_dir():
        raise ConfigError(f"checkpoint folder not found: {checkpoint}")
    info = read_run_info(Path(checkpoint))
    if router_prompt == "auto":
        router_prompt = info.get("router_prompt")
        if router_prompt not in ROUTER_PROMPTS:
            counts = info.get("router_prompt_counts")
            raise ConfigError(
                f"{checkpoint} records no single router prompt variant"
                + (f" (its router samples: {counts})" if counts else "")
                + f"; pass the variant the model was trained with ({', '.join(ROUTER_PROMPTS)})"
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    converter = find_converter(llama_cpp_dir)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.stem}-export-") as tmp:
        work = Path(tmp)
        hf_dir = merged_folder(checkpoint, work, base_model)
        f16 = work / "model-f16.gguf"
        _convert(hf_dir, f16, converter)
        quantized = f16
        if quant != "f16":
            quantized = work / f"model-{quant}.gguf"
            _quantize(f16, quantized, quant, threads)
        manifest = {
            "checkpoint": str(checkpoint.resolve()),
            "base_model": base_model or info.get("config", {}).get("model"),
            "trainer": info.get("trainer"),
            "train_steps": info.get("result", {}).get("steps"),
            "train_samples": info.get("result", {}).get("samples"),
            "quant": quant,
            "router_prompt": router_prompt,
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "versions": {
                "kbrouter": _version("kbrouter"),
                "llama_cpp_python": llama_cpp_version(),
                "transformers": _version("transformers"),
                "peft": _version("peft"),
            },
        }
        entries = {MANIFEST_KEY: json.dumps(manifest, sort_keys=True)}
        if router_prompt is not None:
            entries[ROUTER_PROMPT_KEY] = router_prompt
        final = work / "model-final.gguf"
        _add_metadata(quantized, final, entries)
        final.replace(out)
    logger.info("exported %s (%s) in %.0f s", out, quant, time.perf_counter() - t0)
    return out


def _version(dist: str) -> str | None:
    try:
        return importlib_metadata.version(dist)
    except importlib_metadata.PackageNotFoundError:
        return None
