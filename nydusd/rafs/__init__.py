"""nydusd.rafs package."""
