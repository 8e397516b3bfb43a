"""Loading the model to train and saving checkpoints the transformers backend can load.

Model specs (``StepGRPOConfig.model`` / ``SFTConfig.model`` / ``--model``):

- a Hugging Face hub id or a checkpoint folder (``save_pretrained`` layout);
- a ``.gguf`` file — de-quantised to float32 by transformers (``gguf_file=...``);
- a packaged GGUF preset name such as ``smollm2-135m`` (see :mod:`kbrouter.models.gguf`);
- a LoRA training run's folder (``<run>/final``: ``adapter/`` plus ``kbrouter_train.json``
  naming the base model) — the adapter is merged into its base, so a trainer can start from
  another run (Step-GRPO from an SFT run);
- any of the above prefixed with ``transformers:`` (the chat-backend spec form).

GGUF models are converted once into an HF folder (``materialize_model``) so that trainers that
reload the model by name (TRL's reference model for ``beta > 0``, vLLM, multi-process
launchers) find a real folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

from kbrouter.errors import ConfigError, ModelError

logger = logging.getLogger(__name__)


def _strip_prefix(spec: str) -> str:
    spec = spec.strip()
    for prefix in ("transformers:", "hf:"):
        if spec.lower().startswith(prefix):
            return spec[len(prefix) :].strip()
    return spec


def resolve_gguf_spec(spec: str) -> Path | None:
    """The GGUF file a spec names (file path or packaged preset), or None for HF specs."""
    spec = _strip_prefix(spec)
    if spec.lower().endswith(".gguf"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ConfigError(f"GGUF model file not found: {path}")
        return path
    from kbrouter.models.gguf import PRESETS, resolve_gguf

    if spec in PRESETS:
        return resolve_gguf(spec)
    return None


def lora_adapter(spec: str | Path) -> Path | None:
    """The adapter folder of a LoRA run folder (no full weights), else None."""
    folder = Path(_strip_prefix(str(spec))).expanduser()
    if not folder.is_dir() or (folder / "config.json").is_file():
        return None
    for adapter in (folder / "adapter", folder):
        if (adapter / "adapter_config.json").is_file():
            return adapter
    return None


def _lora_base(checkpoint: Path, base_model: str | None) -> str:
    """The base model of a LoRA run: ``base_model``, else the run info's ``config.model``,
    else the adapter's own ``base_model_name_or_path`` (a plain PEFT adapter folder)."""
    from kbrouter.train.run import read_run_info

    base = base_model or read_run_info(checkpoint).get("config", {}).get("model")
    if not base:
        adapter = lora_adapter(checkpoint)
        if adapter is not None:
            try:
                cfg = json.loads((adapter / "adapter_config.json").read_text())
            except (OSError, ValueError) as e:
                raise ConfigError(f"{adapter}/adapter_config.json is unreadable: {e}") from e
            base = cfg.get("base_model_name_or_path") if isinstance(cfg, dict) else None
    if not base:
        raise ConfigError(
            f"{checkpoint} holds a LoRA adapter but names no base model; pass base_model"
        )
    return str(base)


def _no_cycle(checkpoint: Path, seen: frozenset[Path]) -> frozenset[Path]:
    key = checkpoint.expanduser().resolve()
    if key in seen:
        chain = " -> ".join(str(p) for p in (*seen, key))
        raise ConfigError(f"the LoRA runs name each other as base models: {chain}")
    return seen | {key}


def load_tokenizer(spec: str, padding_side: str = "right") -> Any:
    """The tokenizer of a model spec, with a pad token set (a LoRA run without its own
    tokenizer files uses its base model's, through any chain of runs)."""
    from transformers import AutoTokenizer

    spec = _strip_prefix(spec)
    seen: frozenset[Path] = frozenset()
    adapter = lora_adapter(spec)
    while adapter is not None and not (adapter / "tokenizer_config.json").is_file():
        seen = _no_cycle(Path(spec), seen)
        spec = _lora_base(Path(spec).expanduser(), None)  # the base model's tokenizer
        adapter = lora_adapter(spec)
    gguf = resolve_gguf_spec(spec) if adapter is None else None
    try:
        if adapter is not None:
            tok = AutoTokenizer.from_pretrained(str(adapter))
        elif gguf is not None:
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        else:
            tok = AutoTokenizer.from_pretrained(spec)
    except Exception as e:  # noqa: BLE001 - any loader failure becomes one named error
        raise ModelError(f"cannot load the tokenizer of {spec!r}: {type(e).__name__}: {e}") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


def load_causal_lm(spec: str, dtype: str = "float32") -> Any:
    """A ``transformers`` causal LM from a spec (GGUF weights are de-quantised; a LoRA run is
    merged into its base, through any chain of runs)."""
    return _load_causal_lm(spec, dtype, frozenset())


def _load_causal_lm(spec: str, dtype: str, seen: frozenset[Path]) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    spec = _strip_prefix(spec)
    if lora_adapter(spec) is not None:
        return _merged_lora(Path(spec).expanduser(), None, dtype, seen)
    gguf = resolve_gguf_spec(spec)
    torch_dtype = getattr(torch, dtype)
    try:
        if gguf is not None:
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch_dtype
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(spec, dtype=torch_dtype)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"cannot load model {spec!r}: {type(e).__name__}: {e}") from e
    if gguf is not None:
        _strip_gguf_origin(model)
    return model


def _merged_lora(
    checkpoint: Path,
    base_model: str | None,
    dtype: str = "float32",
    seen: frozenset[Path] = frozenset(),
) -> Any:
    """A LoRA run's adapter merged into a fresh copy of its base model (in memory)."""
    from peft import PeftModel

    seen = _no_cycle(checkpoint, seen)
    adapter = lora_adapter(checkpoint)
    if adapter is None:
        raise ConfigError(f"{checkpoint} is not a LoRA run (no adapter/adapter_config.json)")
    base = _lora_base(checkpoint, base_model)
    logger.info("merging the LoRA adapter %s into %s", adapter, base)
    model = _load_causal_lm(base, dtype, seen)
    try:
        merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    except Exception as e:  # noqa: BLE001 - a damaged or mismatched adapter: one named error
        raise ModelError(
            f"cannot apply the LoRA adapter {adapter} to {base}: {type(e).__name__}: {e}"
        ) from e
    _strip_gguf_origin(merged)
    return merged


def model_source(spec: str, base_model: str | None = None) -> dict[str, Any]:
    """What a model spec is made of, down the chain of LoRA runs to the base weights (file
    sizes and modification times): equal sources mean the same weights. Used to tell a stale
    merge, or a resumed run whose starting model changed."""
    return _source(spec, base_model, frozenset())


def _stat(path: Path | None) -> dict[str, Any]:
    if path is None or not path.exists():
        return {"path": str(path), "missing": True}
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime": st.st_mtime}


def _source(spec: str, base_model: str | None, seen: frozenset[Path]) -> dict[str, Any]:
    spec = _strip_prefix(spec)
    adapter = lora_adapter(spec)
    if adapter is not None:
        folder = Path(spec).expanduser()
        seen = _no_cycle(folder, seen)
        weights = next(iter(sorted(adapter.glob("adapter_model.*"))), None)
        base = _lora_base(folder, base_model)
        return {"adapter": _stat(weights), "base": _source(base, None, seen)}
    gguf = resolve_gguf_spec(spec)
    if gguf is not None:
        return {"gguf": _stat(gguf)}
    folder = Path(spec).expanduser()
    if folder.is_dir():
        weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
        return {"folder": str(folder.resolve()), "weights": [_stat(w) for w in weights]}
    return {"id": spec}  # a hub id: its revision is the hub's business


def merge_lora_run(checkpoint: str | Path, out: Path, base_model: str | None = None) -> Path:
    """An HF folder with full weights for ``checkpoint``: the checkpoint itself when it has
    them, else its LoRA adapter merged into the base model (through any chain of LoRA runs),
    written to ``out`` — kept when ``out`` already holds a merge of the same sources
    (:func:`model_source`), else replaced whole (written beside it, then renamed)."""
    import shutil
    import tempfile

    checkpoint = Path(_strip_prefix(str(checkpoint))).expanduser()
    if not checkpoint.is_dir():
        raise ConfigError(f"checkpoint folder not found: {checkpoint}")
    if (checkpoint / "config.json").is_file():
        return checkpoint  # full weights (a LoRA run with merge_on_save already merged them)
    adapter = lora_adapter(checkpoint)
    if adapter is None:
        raise ConfigError(
            f"{checkpoint} is neither a model folder (config.json) nor a LoRA run "
            "(adapter/adapter_config.json)"
        )
    source = json.loads(json.dumps(model_source(str(checkpoint), base_model)))
    marker = out / "kbrouter_source.json"
    try:
        if json.loads(marker.read_text()) == source:
            return out
    except (OSError, ValueError):
        pass  # no merge yet, or a damaged marker: merge again
    merged = _merged_lora(checkpoint, base_model)
    tok_dir = adapter if (adapter / "tokenizer_config.json").is_file() else None
    tokenizer = load_tokenizer(str(tok_dir) if tok_dir else _lora_base(checkpoint, base_model))
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        merged.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        (staged / "kbrouter_source.json").write_text(json.dumps(source))
        if out.exists():
            shutil.rmtree(out)
        staged.rename(out)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return out


def materialize_model(spec: str, folder: Path) -> str:
    """An HF-folder spec for ``spec``: GGUF specs are converted once into ``folder``, a LoRA
    run's adapter is merged into its base once into ``folder``.

    HF ids and full-weight folders are returned unchanged. The conversion is skipped when
    ``folder`` already holds a conversion of the same file.
    """
    spec = _strip_prefix(spec)
    if lora_adapter(spec) is not None:
        return str(merge_lora_run(spec, folder))
    gguf = resolve_gguf_spec(spec)
    if gguf is None:
        return spec
    marker = folder / "kbrouter_source.json"
    source = {"gguf": str(gguf.resolve()), "size": gguf.stat().st_size}
    if marker.is_file() and json.loads(marker.read_text()) == source:
        return str(folder)
    logger.info("converting %s into an HF folder at %s", gguf, folder)
    model = load_causal_lm(spec)
    tok = load_tokenizer(spec)
    _strip_gguf_origin(model)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    marker.write_text(json.dumps(source))
    return str(folder)


def _strip_gguf_origin(model: Any) -> None:
    """Forget that weights came from a GGUF file: they are plain float32 tensors now, and a
    saved config claiming GGUF quantisation would not load as a normal checkpoint."""
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "quantization_config", None) is not None:
        qc = cfg.quantization_config
        method = (
            qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
        )
        if str(method).lower().endswith("gguf"):
            try:
                del cfg.quantization_config
            except AttributeError:
                cfg.quantization_config = None
            if getattr(model, "hf_quantizer", None) is not None:
                model.hf_quantizer = None
            if hasattr(model, "is_quantized"):
                with contextlib.suppress(AttributeError):
                    model.is_quantized = False


def save_checkpoint(model: Any, tokenizer: Any, folder: Path, merge_lora: bool = True) -> Path:
    """Save a model as a plain HF folder (LoRA adapters merged unless told otherwise)."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is in the train extra
        PeftModel = None  # noqa: N806
    if PeftModel is not None and isinstance(model, PeftModel) and merge_lora:
        model = model.merge_and_unload()
    _strip_gguf_origin(model)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_trained(trainer: Any, folder: Path, base_spec: str, merge_lora: bool = True) -> Path:
    """Save a TRL trainer's model as a checkpoint loadable by ``transformers:<folder>``.

    Uses ``trainer.save_model`` (correct under DeepSpeed ZeRO-3 / FSDP: gathers the weights,
    writes from the main process only). LoRA runs save the adapter under ``<folder>/adapter``
    and, with ``merge_lora``, the main process merges it into a fresh copy of the base model
    and writes the merged model to ``folder``.
    """
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        PeftModel = None  # noqa: N806
    acc = trainer.accelerator
    model = acc.unwrap_model(trainer.model)
    _strip_gguf_origin(model)
    is_peft = PeftModel is not None and isinstance(model, PeftModel)
    if not is_peft:
        trainer.save_model(str(folder))
        acc.wait_for_everyone()
        return folder
    adapter_dir = folder / "adapter"
    trainer.save_model(str(adapter_dir))
    acc.wait_for_everyone()
    if merge_lora and acc.is_main_process:
        base = load_causal_lm(base_spec)
        _strip_gguf_origin(base)
        merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
        merged.save_pretrained(folder)
        trainer.processing_class.save_pretrained(folder)
    acc.wait_for_everyone()
    return folder
