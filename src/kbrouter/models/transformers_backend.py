"""In-process chat backend on Hugging Face transformers.

Loads any causal chat model (a hub id, a local checkpoint dir, or a ``.gguf`` file, which
transformers de-quantizes with the ``gguf`` package) and formats prompts with the model's own
chat template. Vision-language models (Qwen2.5-VL style: the config has a ``vision_config``)
are loaded with ``AutoProcessor`` + ``AutoModelForImageTextToText`` and receive the images;
text-only models get :data:`~kbrouter.models._messages.IMAGE_NOTE` instead.

Generation runs in a worker thread, one request at a time (a model instance is not safe to
share between concurrent ``generate`` calls). Greedy when ``temperature == 0``; sampling is
seeded through ``transformers.set_seed`` inside the serialised section, so results repeat.
GBNF grammars are not enforced (``supports_grammar = False``). Hub downloads obey the usual
``HF_HUB_OFFLINE`` / cache settings.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kbrouter.errors import ConfigError, ModelError
from kbrouter.files import file_sha256
from kbrouter.models._messages import IMAGE_NOTE, image_bytes, message_text
from kbrouter.models.base import ChatModel, PerLoopLock
from kbrouter.types import ChatMessage, ChatResult, ImagePart, SamplingParams

logger = logging.getLogger(__name__)


class TransformersConfig(BaseModel):
    """Settings of :class:`TransformersModel`."""

    model_config = ConfigDict(extra="forbid")

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "float32", description="Weight dtype; float32 is the safe CPU choice, auto = checkpoint's."
    )
    device: str = Field("cpu", description="torch device, e.g. cpu, cuda, cuda:1.")
    gguf_file: str | None = Field(
        None, description="GGUF file name inside the model dir (set automatically for *.gguf)."
    )
    vision: bool | None = Field(
        None, description="Treat as a vision-language model; None = detect from the config."
    )
    trust_remote_code: bool = Field(False, description="Allow code shipped with the checkpoint.")
    timeout: float = Field(600.0, gt=0, description="Seconds one generation may take (max_time).")
    image_note: str = Field(IMAGE_NOTE, description="Text replacing images for text-only models.")
    max_image_side: int | None = Field(
        None, gt=0, description="Downscale images so their longest side is at most this."
    )
    context_window: int | None = Field(
        None, gt=0, description="Prompt+reply limit; None = the config's max_position_embeddings."
    )


class TransformersModel(ChatModel):
    """A Hugging Face chat model run in-process (text, or vision-language with images)."""

    supports_grammar = False

    def __init__(
        self, model: str | Path, *, config: TransformersConfig | None = None, **kwargs: Any
    ):
        if config is None:
            try:
                config = TransformersConfig(**kwargs)
            except ValueError as e:
                raise ConfigError(f"invalid transformers backend settings: {e}") from e
        elif kwargs:
            raise ConfigError("pass either config= or individual settings, not both")
        path = Path(str(model)).expanduser()
        if path.suffix.lower() == ".gguf":
            if not path.is_file():
                raise ConfigError(f"GGUF file {str(path)!r} does not exist")
            config = config.model_copy(update={"gguf_file": path.name})
            self.source = str(path.parent)
        else:
            self.source = str(path) if path.exists() else str(model)
        self.config = config
        self.name = path.name if path.exists() else str(model)
        # Known before the first question is prompted (prompts differ for vision models): a
        # local checkpoint's config.json tells; otherwise it is detected when weights load.
        vision = config.vision if config.vision is not None else _local_vision(Path(self.source))
        self.supports_images = bool(vision)
        self.context_window = config.context_window
        self._identity: dict | None = None
        self._model: Any = None
        self._tokenizer: Any = None
        self._processor: Any = None
        self._thread_lock = threading.Lock()
        self._lock = PerLoopLock()

    # ------------------------------------------------------------------ public API

    @property
    def prompt_variant(self) -> str | None:
        """The router prompt variant a kbrouter training run recorded for this checkpoint
        (``router_prompt`` in its ``kbrouter_train.json``), or None."""
        info = Path(self.source) / "kbrouter_train.json"
        if not info.is_file():
            return None
        try:
            variant = json.loads(info.read_text(encoding="utf-8")).get("router_prompt")
        except (OSError, ValueError):
            return None
        return variant if isinstance(variant, str) else None

    def load(self) -> None:
        """Load tokenizer/processor and weights now (otherwise done by the first call)."""
        with self._thread_lock:
            self._load_locked()

    async def chat(
        self, messages: list[ChatMessage], params: SamplingParams | None = None
    ) -> ChatResult:
        params = params or SamplingParams()
        async with self._lock.get():
            return await asyncio.to_thread(self._chat_sync, messages, params)

    async def aclose(self) -> None:
        await asyncio.to_thread(self._close_sync)

    def _close_sync(self) -> None:
        with self._thread_lock:  # waits for a running generation
            self._model = self._tokenizer = self._processor = None

    def describe(self) -> dict:
        cfg = self.config
        return {
            "backend": type(self).__name__,
            "name": self.name,
            "source": self.source,
            "gguf_file": cfg.gguf_file,
            "dtype": cfg.dtype,
            "device": cfg.device,
            "vision": self.supports_images,
        }

    def identity(self) -> dict:
        """A local checkpoint by the sha256 of its weight and config files (hashed once per
        process), a hub model by its id; plus dtype and vision, which change outputs."""
        if self._identity is None:
            self._identity = {
                "backend": "transformers",
                "weights": _weights_digest(Path(self.source), self.config.gguf_file) or self.source,
                "dtype": self.config.dtype,
                "vision": self.supports_images,
            }
        return dict(self._identity)

    def format_prompt(self, messages: list[ChatMessage]) -> str:
        """The exact prompt text the model sees (chat template applied, images as placeholders)."""
        with self._thread_lock:
            self._load_locked()
            return self._template(self._wire(messages))

    # ------------------------------------------------------------------ internals

    def _load_locked(self) -> None:
        if self._model is not None:
            return
        try:
            import torch
            import transformers
        except ImportError as e:
            raise ModelError(
                "the transformers backend needs torch and transformers: "
                "pip install 'kbrouter[train]'"
            ) from e
        cfg = self.config
        kw: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
        if cfg.gguf_file:
            kw["gguf_file"] = cfg.gguf_file
        dtype = "auto" if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
        t0 = time.perf_counter()
        try:
            vision = cfg.vision
            if vision is None:
                hf_config = transformers.AutoConfig.from_pretrained(self.source, **kw)
                vision = getattr(hf_config, "vision_config", None) is not None
            if vision:
                self._processor = transformers.AutoProcessor.from_pretrained(self.source, **kw)
                self._tokenizer = self._processor.tokenizer
                model_cls = transformers.AutoModelForImageTextToText
            else:
                self._tokenizer = transformers.AutoTokenizer.from_pretrained(self.source, **kw)
                model_cls = transformers.AutoModelForCausalLM
            model = model_cls.from_pretrained(self.source, dtype=dtype, **kw)
            model.to(cfg.device)
            model.eval()
        except (OSError, ValueError, KeyError, RuntimeError, ImportError) as e:
            raise ModelError(f"transformers cannot load {self.source!r}: {e}") from e
        if self._tokenizer.chat_template is None and (
            self._processor is None or getattr(self._processor, "chat_template", None) is None
        ):
            raise ModelError(f"model {self.source!r} has no chat template")
        self.supports_images = bool(vision)
        if self.context_window is None:
            text_cfg = getattr(model.config, "text_config", None) or model.config
            self.context_window = getattr(text_cfg, "max_position_embeddings", None)
        self._model = model
        logger.info("loaded %s in %.1f s", self.source, time.perf_counter() - t0)

    def _wire(self, messages: list[ChatMessage]) -> list[dict]:
        """Template input: plain strings (text-only) or typed parts (vision)."""
        if not self.supports_images:
            return [
                {"role": m.role, "content": message_text(m, self.config.image_note)}
                for m in messages
            ]
        out = []
        for m in messages:
            if isinstance(m.content, str):
                out.append({"role": m.role, "content": [{"type": "text", "text": m.content}]})
                continue
            parts = [
                {"type": "image"} if isinstance(p, ImagePart) else {"type": "text", "text": p.text}
                for p in m.content
            ]
            out.append({"role": m.role, "content": parts})
        return out

    def _template(self, wire: list[dict]) -> str:
        owner = self._processor if self.supports_images else self._tokenizer
        return owner.apply_chat_template(wire, add_generation_prompt=True, tokenize=False)

    def _images(self, messages: list[ChatMessage]) -> list[Any]:
        import io

        from PIL import Image

        images = []
        for m in messages:
            for path in m.images():
                raw, _ = image_bytes(path, self.config.max_image_side)
                images.append(Image.open(io.BytesIO(raw)).convert("RGB"))
        return images

    def _chat_sync(self, messages: list[ChatMessage], params: SamplingParams) -> ChatResult:
        with self._thread_lock:
            self._load_locked()
            import torch
            import transformers

            prompt = self._template(self._wire(messages))
            if self.supports_images:
                images = self._images(messages)
                inputs = self._processor(text=[prompt], images=images or None, return_tensors="pt")
            else:
                # The template already holds any BOS token.
                enc = self._tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
                inputs = {k: enc[k] for k in ("input_ids", "attention_mask") if k in enc}
            inputs = {k: v.to(self.config.device) for k, v in inputs.items()}
            n_prompt = int(inputs["input_ids"].shape[1])
            max_new = params.max_tokens
            if self.context_window is not None:
                if n_prompt >= self.context_window:
                    raise ModelError(
                        f"prompt of {n_prompt} tokens exceeds the context window "
                        f"({self.context_window}) of {self.name}"
                    )
                max_new = min(max_new, self.context_window - n_prompt)
            gen: dict[str, Any] = {
                "max_new_tokens": max_new,
                "max_time": self.config.timeout,
                "do_sample": params.temperature > 0,
                "pad_token_id": self._tokenizer.pad_token_id or self._tokenizer.eos_token_id,
            }
            if params.temperature > 0:
                gen.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
            else:  # silence "temperature is set but do_sample=False" from generation_config
                gen.update(temperature=None, top_p=None, top_k=None)
            if params.stop:
                gen.update(stop_strings=list(params.stop), tokenizer=self._tokenizer)
            transformers.set_seed(params.seed)
            t0 = time.perf_counter()
            try:
                with torch.inference_mode():
                    out = self._model.generate(**inputs, **gen)
            except (RuntimeError, ValueError) as e:
                raise ModelError(f"generation with {self.name} failed: {e}") from e
            seconds = time.perf_counter() - t0
            new_ids = out[0][n_prompt:].tolist()
            eos = self._eos_ids()
            n_new = len(new_ids)
            for i, tok in enumerate(new_ids):
                if tok in eos:
                    n_new = i + 1
                    break
            text = self._tokenizer.decode(new_ids[:n_new], skip_special_tokens=True)
        finish = "stop" if (new_ids[:n_new] and new_ids[n_new - 1] in eos) else "length"
        for stop in params.stop:
            cut = text.find(stop)
            if cut >= 0:
                text, finish = text[:cut], "stop"
        if finish == "length" and seconds >= self.config.timeout:
            raise ModelError(f"generation with {self.name} exceeded {self.config.timeout:g} s")
        return ChatResult(
            text=text,
            prompt_tokens=n_prompt,
            completion_tokens=n_new,
            seconds=seconds,
            model=self.name,
            finish_reason=finish,
        )

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for value in (
            getattr(self._model.generation_config, "eos_token_id", None),
            self._tokenizer.eos_token_id,
        ):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list):
                ids.update(v for v in value if isinstance(v, int))
        return ids


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".json", ".model", ".txt")


def _weights_digest(folder: Path, gguf_file: str | None) -> str | None:
    """sha256 over a local checkpoint's weight, config and tokenizer files (None: not local)."""
    import hashlib

    from kbrouter.models.gguf import gguf_sha256

    if not folder.is_dir():
        return None
    if gguf_file:
        return gguf_sha256(folder / gguf_file)
    h = hashlib.sha256()
    for f in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES):
        h.update(f.name.encode("utf-8") + b"\0" + file_sha256(f).encode("ascii") + b"\n")
    return h.hexdigest()


def _local_vision(folder: Path) -> bool | None:
    """Whether a local checkpoint is a vision-language model (its config has a
    ``vision_config``); None when there is no readable local config.json."""
    import json

    try:
        data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return isinstance(data, dict) and data.get("vision_config") is not None
