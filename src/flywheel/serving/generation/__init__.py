"""Text generation of a LoRA project: `/v1/generate` and the OpenAI-compatible endpoints, on the
champion adapter, with bounded generation slots per client."""
