"""nydusd.storage package."""
