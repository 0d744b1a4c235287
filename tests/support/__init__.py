"""Real components for tests: a throwaway PostgreSQL server, a local HTTP server
with misbehaving routes, and a corpus of awkward image files."""
