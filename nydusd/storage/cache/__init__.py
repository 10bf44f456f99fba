"""nydusd.storage.cache package."""
