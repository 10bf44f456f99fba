"""nydusd.builder package."""
