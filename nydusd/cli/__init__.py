"""nydusd.cli package."""
