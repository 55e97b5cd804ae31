"""Serving: SavedModel export, the HTTP server and its slot scheduler (see docs/serving.md)."""
