"""nydusd.storage.backend package."""
