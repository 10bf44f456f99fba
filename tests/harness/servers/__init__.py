"""Fixtures that start real servers on 127.0.0.1 (docker-registry, tinyproxy, moto S3, OSS test server)."""
