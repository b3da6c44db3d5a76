"""Serving: a weights archive -> the chat model -> streamed answers."""
