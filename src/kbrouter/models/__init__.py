"""Chat model backends: OpenAI-compatible HTTP, llama.cpp in-process, transformers."""
