"""Serving: the HTTP API (FastAPI, server-sent events, an OpenAI-compatible endpoint)."""
