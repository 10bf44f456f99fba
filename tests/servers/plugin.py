"""pytest plugin: registers the server fixtures of ``tests/servers`` (filled in by the storage work)."""
