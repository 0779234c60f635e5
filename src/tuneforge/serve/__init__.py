"""Serving models and adapters: an interactive terminal chat (chat.py)."""
