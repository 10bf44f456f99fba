"""nydusd.fs package."""
