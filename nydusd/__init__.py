"""nydus-py: a Python implementation of the Nydus image service (RAFS, nydusd, nydus-image, nydusify)."""

__version__ = "0.1.0"
