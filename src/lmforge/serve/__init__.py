"""The OpenAI-compatible server: HTTP API, web UI and metrics over the batched engine."""
