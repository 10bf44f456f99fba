"""nydusd.converter package."""
