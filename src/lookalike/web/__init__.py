"""The web app: search page, duplicates and collection pages, JSON API (``lookalike serve``)."""

from .app import create_app, serve

__all__ = ["create_app", "serve"]
