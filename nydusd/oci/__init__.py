"""nydusd.oci package."""
