"""Serving: the OpenAI-compatible server (app), its engine, adapters and cache, the router, local server instances,
deploy, the request log and user feedback, vLLM manifests."""
