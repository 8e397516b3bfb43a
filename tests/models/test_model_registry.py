"""Model specs resolve to the right backend, bad specs to a ConfigError listing the forms."""

from __future__ import annotations

import pytest

from kbrouter.errors import ConfigError
from kbrouter.models.openai_compat import OpenAICompatibleModel
from kbrouter.models.registry import load_model


def test_openai_spec_with_url():
    """openai:<model>@<url> sets the model name and base URL."""
    model = load_model("openai:Qwen/Qwen2.5-VL-7B-Instruct@http://gpu:8000/v1", vision=True)
    assert isinstance(model, OpenAICompatibleModel)
    assert model.name == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert model.config.base_url == "http://gpu:8000/v1"
    assert model.supports_images


def test_openai_spec_uses_env_url(monkeypatch: pytest.MonkeyPatch):
    """openai:<model> takes the base URL from the environment."""
    monkeypatch.setenv("KBROUTER_OPENAI_BASE_URL", "http://localhost:11434/v1")
    model = load_model("openai:llama3.2")
    assert model.config.base_url == "http://localhost:11434/v1"


def test_openai_spec_without_model_is_config_error(monkeypatch: pytest.MonkeyPatch):
    """openai: with no model name anywhere is a ConfigError."""
    monkeypatch.delenv("KBROUTER_OPENAI_MODEL", raising=False)
    with pytest.raises(ConfigError, match="model name"):
        load_model("openai:")


@pytest.mark.parametrize("spec", ["gpt", "vllm:foo", "", "transformers:"])
def test_unknown_spec_lists_forms(spec: str):
    """An unknown or incomplete spec names itself and the accepted forms."""
    with pytest.raises(ConfigError, match="transformers:<path or"):
        load_model(spec)


def test_bad_kwarg_is_config_error():
    """A misspelt backend option fails with a ConfigError naming it."""
    with pytest.raises(ConfigError, match="visoin"):
        load_model("openai:m@http://h:1/v1", visoin=True)


def test_llama_cpp_spec_resolves_preset_without_loading():
    """llama-cpp:<preset> resolves the GGUF file; the weights load only on first use."""
    pytest.importorskip("llama_cpp")
    from kbrouter.models.llama_cpp import LlamaCppModel

    model = load_model("llama-cpp:smollm2-135m", n_ctx=1024)
    assert isinstance(model, LlamaCppModel)
    assert model.model_path.suffix == ".gguf"
    assert model.context_window == 1024
    assert model._llm is None


def test_llama_cpp_spec_with_missing_file_is_config_error(tmp_path):
    """A GGUF path that does not exist names itself and the presets."""
    with pytest.raises(ConfigError, match="nothing.gguf"):
        load_model(f"llama-cpp:{tmp_path / 'nothing.gguf'}")


def test_transformers_spec():
    """transformers:<id> builds the transformers backend lazily."""
    from kbrouter.models.transformers_backend import TransformersModel

    model = load_model("transformers:HuggingFaceTB/SmolLM2-135M-Instruct", dtype="float32")
    assert isinstance(model, TransformersModel)
    assert model.name == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_spec_settings_after_semicolons(tmp_path):
    """`<spec>;key=value;...` settings go to the backend (JSON values), kwargs win, bad ones are
    clear errors."""
    from kbrouter.models.llama_cpp import LlamaCppModel

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(16))
    model = load_model(f"llama-cpp:{gguf};n_ctx=1024;n_threads=1")
    assert isinstance(model, LlamaCppModel) and model.config.n_ctx == 1024
    assert load_model(f"llama-cpp:{gguf};n_ctx=1024", n_ctx=2048).config.n_ctx == 2048
    model = load_model("openai:m@http://gpu:8000/v1;grammar_mode=vllm;vision=true")
    assert model.config.grammar_mode == "vllm" and model.supports_images
    with pytest.raises(ConfigError, match="not key=value"):
        load_model("openai:m@http://gpu:8000/v1;vision")
    with pytest.raises(ConfigError, match="nope"):
        load_model("openai:m@http://gpu:8000/v1;nope=1")


def test_a_local_vision_checkpoint_is_known_before_loading(tmp_path):
    """A transformers VLM is detected from its config.json at construction, so the first
    question is already prompted with its image."""
    import json

    from kbrouter.models.transformers_backend import TransformersModel

    vlm, text = tmp_path / "vlm", tmp_path / "text"
    for folder, cfg in [(vlm, {"vision_config": {"depth": 2}}), (text, {"hidden_size": 8})]:
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(cfg))
    assert TransformersModel(vlm).supports_images
    assert not TransformersModel(text).supports_images
    assert not TransformersModel(vlm, vision=False).supports_images
