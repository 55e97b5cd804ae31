"""The foundation: the params schema and its loading, run modes, atomic file writes.

Every other package may import this one; it imports nothing of the project."""
