"""Serving one base model with many adapters.

engine.py     continuous batching (scheduler.py), the per-slot KV cache (kv_cache.py), sampling
              (sampling.py); every batch row may use its own adapter, LoRA deltas gathered per row
adapters.py   adapters loaded on demand by name from a directory, LRU, pinning, safe names
api.py        the OpenAI-compatible HTTP API (FastAPI); metrics.py: Prometheus text
command.py    `tuneforge serve`;  chat.py: `tuneforge chat`, the terminal chat on the same engine
"""
