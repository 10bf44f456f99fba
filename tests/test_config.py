"""Tests for nydusd.config: samples in config/, v1/v2 JSON/TOML normalisation, validation messages,
unknown-key logging, the ``//`` comment decision, IMAGE_PULL_AUTH and the serialised form."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from nydusd.config import (
    MAX_CONFIG_SIZE,
    BackendConfig,
    CacheConfig,
    ConfigV2,
    FileCacheConfig,
    HttpProxyConfig,
    LocalDiskConfig,
    LocalFsConfig,
    OssConfig,
    OverlayConfig,
    PrefetchConfig,
    ProxyConfig,
    RafsConfig,
    RegistryConfig,
    S3Config,
    apply_image_pull_auth,
    load_config,
    load_config_file,
    strip_json_comments,
)
from nydusd.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"
SAMPLES = sorted(p for p in CONFIG_DIR.iterdir() if p.is_file())


def attr(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


# -------------------------------------------------------------------------------------- samples
EXPECTED: dict[str, dict[str, Any]] = {
    "nydusd-config.registry-p2p.json": {
        "backend.type": "registry", "backend.sub.host": "my-registry:5000", "backend.sub.repo": "test/repo",
        "backend.sub.auth": "<base64_encoded_auth>", "backend.sub.proxy.url": "http://p2p-proxy:65001",
        "cache.work_dir": "/cache", "rafs.prefetch.threads": 4, "rafs.prefetch.batch_size": 131072,
    },
    "nydusd-config.localfs.json": {
        "backend.type": "localfs", "backend.sub.dir": "blobs", "backend.sub.readahead": True,
        "cache.kind": "filecache", "cache.work_dir": "cache", "rafs.enable_xattr": True,
    },
    "nydusd-config.registry-dragonfly.json": {
        "id": "/42", "backend.sub.scheme": "http", "backend.sub.host": "127.0.0.1:5000",
        "backend.sub.repo": "library/ubuntu", "backend.sub.auth": "dXNlcjpwYXNz", "backend.sub.timeout": 10,
        "backend.sub.connect_timeout": 3, "backend.sub.retry_limit": 2,
        "backend.sub.proxy.url": "http://127.0.0.1:65001",
        "backend.sub.proxy.ping_url": "http://127.0.0.1:40901/server/ping",
        "backend.sub.proxy.check_interval": 10, "backend.sub.proxy.use_http": True,
        "backend.sub.proxy.check_pause_elapsed": 600, "rafs.iostats_files": True,
        "rafs.access_pattern": True, "rafs.latest_read_files": True,
        "rafs.prefetch.bandwidth_limit": 10485760, "cache.prefetch.bandwidth_limit": 10485760,
    },
    "nydusd-config.dragonfly-sdk.json": {
        "backend.sub.proxy.dragonfly_scheduler_endpoint": "http://127.0.0.1:8002",
        "backend.sub.proxy.fallback": False, "backend.sub.proxy.url": "http://127.0.0.1:4001",
        "cache.validate": True, "rafs.validate": True, "chunk_validation": True,
        "rafs.prefetch.threads": 10, "cache.prefetch.bandwidth_limit": 1048576,
    },
    "nydusd-config.oss.json": {
        "backend.type": "oss", "backend.sub.endpoint": "127.0.0.1:9000", "backend.sub.scheme": "http",
        "backend.sub.bucket_name": "nydus-blobs", "backend.sub.object_prefix": "images/",
        "backend.sub.access_key_id": "test-access-key-id", "backend.sub.retry_limit": 3,
        "rafs.validate": True, "rafs.prefetch.enable": False, "cache.prefetch.enable": False,
    },
    "nydusd-config.s3.json": {
        "backend.type": "s3", "backend.sub.region": "us-east-1", "backend.sub.endpoint": "127.0.0.1:5001",
        "backend.sub.bucket_name": "nydus-blobs", "backend.sub.object_prefix": "nydus/",
        "backend.sub.timeout": 5, "cache.type": "filecache", "rafs.mode": "cached",
    },
    "nydusd-config.blobcache-prefetch.json": {
        "id": "blobcache-prefetch", "backend.sub.blob_file": "/var/lib/nydus/blobs/image.blob",
        "cache.compressed": True, "cache.validate": True, "cache.filecache.disable_indexed_map": True,
        "rafs.batch_size": 524288, "rafs.prefetch.threads": 16, "rafs.prefetch.batch_size": 262144,
        "rafs.prefetch.bandwidth_limit": 20971520, "rafs.prefetch.prefetch_all": False,
        "cache.prefetch.threads": 16,
    },
    "nydusd-config.v2.toml": {
        "id": "registry-v2", "backend.sub.host": "127.0.0.1:5000", "backend.sub.repo": "library/alpine",
        "backend.sub.proxy.fallback": True, "cache.type": "filecache", "cache.prefetch.enable": True,
        "cache.prefetch.threads": 4, "cache.prefetch.prefetch_all": False, "rafs.prefetch.prefetch_all": True,
        "rafs.enable_xattr": True,
    },
    "nydusd-config.v2.json": {
        "id": "http-proxy-v2", "backend.type": "http-proxy", "backend.sub.addr": "http://127.0.0.1:8080",
        "backend.sub.path": "/namespace/blobs", "backend.sub.timeout": 10, "backend.sub.connect_timeout": 5,
        "cache.compressed": True, "cache.work_dir": "/var/lib/nydus/cache", "rafs.prefetch.enable": False,
    },
    "snapshotter-generated.fusedev.json": {
        "id": "/17", "backend.sub.host": "index.docker.io", "backend.sub.proxy.fallback": False,
        "backend.sub.retry_limit": 2, "rafs.batch_size": 1 << 20, "rafs.prefetch.prefetch_all": True,
        "cache.work_dir": "/var/lib/containerd/io.containerd.snapshotter.v1.nydus/cache",
    },
}


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_every_sample_loads_without_warnings(path: Path, logs: Any) -> None:
    cfg = load_config_file(path)
    assert cfg.version == 2 and cfg.backend is not None and cfg.rafs is not None
    assert logs.events("warning") == []
    assert path.name in EXPECTED, f"add key expectations for the new sample {path.name}"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_sample_key_values(name: str) -> None:
    cfg = load_config_file(CONFIG_DIR / name)
    got = {key: attr(cfg, key) for key in EXPECTED[name]}
    assert got == EXPECTED[name]


@pytest.mark.parametrize("path", [p for p in SAMPLES if p.suffix == ".json"], ids=lambda p: p.name)
def test_json_samples_are_plain_json(path: Path) -> None:
    """jq and upstream nydusd reject ``//`` comments: the shipped samples carry none."""
    text = path.read_text()
    assert json.loads(text) == json.loads(strip_json_comments(text))
    assert strip_json_comments(text) == text


# ------------------------------------------------------------------------- the seed's example
# The seed's config, as documented with a ``//`` comment: comments stay accepted on input.
SEED = """{
  "device": {
    "backend": {
      "type": "registry",
      "config": {
        "scheme": "https", "host": "my-registry:5000", "repo": "test/repo",
        // Base64-encoded auth string "user:pass"
        "auth": "<base64_encoded_auth>",
        "blob_url_scheme": "http",
        "proxy": { "url": "http://p2p-proxy:65001", "ping_url": "http://p2p-proxy:40901/server/ping",
                   "fallback": true, "check_interval": 5 },
        "timeout": 5, "connect_timeout": 5, "retry_limit": 2
      }
    },
    "cache": { "type": "blobcache", "config": { "work_dir": "/cache" } }
  },
  "mode": "direct",
  "digest_validate": false,
  "iostats_files": false,
  "enable_xattr": true,
  "fs_prefetch": { "enable": true, "threads_count": 4, "merging_size": 131072 }
}
"""


def test_seed_example_with_its_comment_loads_like_the_plain_sample() -> None:
    assert "// Base64" in SEED
    assert load_config(SEED) == load_config_file(CONFIG_DIR / "nydusd-config.registry-p2p.json")


def test_seed_example_keys_map_to_the_normalised_model() -> None:
    cfg = load_config(SEED)
    assert cfg.backend is not None and cfg.rafs is not None
    reg = cfg.backend.registry
    assert cfg.backend.type == "registry" and cfg.backend.sub is reg
    assert reg == RegistryConfig(
        scheme="https", host="my-registry:5000", repo="test/repo", auth="<base64_encoded_auth>",
        blob_url_scheme="http", timeout=5, connect_timeout=5, retry_limit=2,
        proxy=ProxyConfig(url="http://p2p-proxy:65001", ping_url="http://p2p-proxy:40901/server/ping",
                          fallback=True, check_interval=5))
    assert cfg.cache == CacheConfig(type="blobcache", filecache=FileCacheConfig(work_dir="/cache"),
                                    prefetch=cfg.rafs.prefetch)
    assert cfg.rafs == RafsConfig(
        mode="direct", validate=False, iostats_files=False, enable_xattr=True,
        prefetch=PrefetchConfig(enable=True, threads=4, batch_size=131072, prefetch_all=True))
    assert cfg.backend.localfs is None and cfg.overlay is None


def test_localfs_variant_of_the_seed() -> None:
    text = SEED.replace('"type": "registry"', '"type": "localfs"')
    doc = json.loads(strip_json_comments(text))
    doc["device"]["backend"]["config"] = {"dir": "/path/to/blobs", "readahead": True}
    cfg = load_config(json.dumps(doc))
    assert cfg.backend is not None
    assert cfg.backend.sub == LocalFsConfig(dir="/path/to/blobs", readahead=True)


# ----------------------------------------------------------------------- v1 / v2 equivalence
V1 = """{
  "device": {"id": "eq", "backend": {"type": "oss", "config": {"endpoint": "127.0.0.1:9000",
      "bucket_name": "b", "access_key_id": "ak", "access_key_secret": "sk", "retry_limit": 3,
      "proxy": {"url": "http://127.0.0.1:65001", "fallback": false}}},
    "cache": {"type": "blobcache", "compressed": true, "config": {"work_dir": "/tmp/c"}}},
  "mode": "cached", "digest_validate": true, "iostats_files": true, "enable_xattr": true,
  "access_pattern": true, "latest_read_files": true, "amplify_io": 0,
  "fs_prefetch": {"enable": true, "threads_count": 3, "merging_size": 65536, "bandwidth_rate": 1000}
}"""
PREFETCH_V2 = {"enable": True, "threads": 3, "batch_size": 65536, "bandwidth_limit": 1000,
               "prefetch_all": True}
V2_JSON = json.dumps({
    "version": 2, "id": "eq",
    "backend": {"type": "oss", "oss": {"endpoint": "127.0.0.1:9000", "bucket_name": "b",
                                       "access_key_id": "ak", "access_key_secret": "sk", "retry_limit": 3,
                                       "proxy": {"url": "http://127.0.0.1:65001", "fallback": False}}},
    "cache": {"type": "blobcache", "compressed": True, "filecache": {"work_dir": "/tmp/c"},
              "prefetch": PREFETCH_V2},
    "rafs": {"mode": "cached", "validate": True, "iostats_files": True, "enable_xattr": True,
             "access_pattern": True, "latest_read_files": True, "batch_size": 0, "prefetch": PREFETCH_V2}})
V2_TOML = """
version = 2
id = "eq"
[backend]
type = "oss"
[backend.oss]
endpoint = "127.0.0.1:9000"
bucket_name = "b"
access_key_id = "ak"
access_key_secret = "sk"
retry_limit = 3
proxy = { url = "http://127.0.0.1:65001", fallback = false }
[cache]
type = "blobcache"
compressed = true
filecache = { work_dir = "/tmp/c" }
prefetch = { enable = true, threads = 3, batch_size = 65536, bandwidth_limit = 1000, prefetch_all = true }
[rafs]
mode = "cached"
validate = true
iostats_files = true
enable_xattr = true
access_pattern = true
latest_read_files = true
batch_size = 0
prefetch = { enable = true, threads = 3, batch_size = 65536, bandwidth_limit = 1000, prefetch_all = true }
"""


def test_v1_json_v2_json_and_v2_toml_normalise_equal() -> None:
    v1, v2j, v2t = load_config(V1), load_config(V2_JSON), load_config(V2_TOML)
    assert v1 == v2j == v2t
    assert v1.backend is not None and v1.backend.sub == OssConfig(
        endpoint="127.0.0.1:9000", bucket_name="b", access_key_id="ak", access_key_secret="sk",
        retry_limit=3, proxy=ProxyConfig(url="http://127.0.0.1:65001", fallback=False))
    assert v1.to_dict() == v2t.to_dict()


def test_v1_defaults_differ_from_v2_where_upstream_does() -> None:
    v1 = load_config('{"device": {"backend": {"type": "localfs", "config": {"dir": "/b"}}}, '
                     '"mode": "direct"}')
    v2 = load_config('version = 2\nbackend = { type = "localfs", localfs = { dir = "/b" } }\nrafs = {}')
    assert v1.rafs is not None and v2.rafs is not None
    # fs_prefetch.prefetch_all defaults to true in v1, false in v2
    assert v1.rafs.prefetch == PrefetchConfig(prefetch_all=True)
    assert v2.rafs.prefetch == PrefetchConfig()
    # upstream v1 conversion: a disabled fs prefetch leaves a zeroed blob prefetch config
    assert v1.cache.prefetch == PrefetchConfig(threads=0, batch_size=0, prefetch_all=True)
    assert v1.cache.kind == "dummy" and v1.cache.work_dir == ""


# --------------------------------------------------------------------------------- malformed
def v1(backend: str = '{"type": "registry", "config": {"host": "h", "repo": "r"}}', **top: Any) -> str:
    doc = {"device": {"backend": json.loads(backend)}, "mode": "direct"}
    doc.update(top)
    return json.dumps(doc)


MALFORMED = [
    (v1('{"type": "registry", "config": {"host": "", "repo": "r"}}'),
     "device.backend.config.host: required field is empty"),
    ('{"mode": "direct"}',
     "device: required field is missing (a v1 config needs 'device', a v2 config needs 'version = 2')"),
    ('{"device": {"backend": {"type": "localfs", "config": {"dir": "/b"}}}}',
     "mode: required field is missing"),
    ('{"device": [], "mode": "direct"}', "device: expected an object, got array"),
    (v1('{"type": "ftp", "config": {}}'),
     "device.backend.type: unsupported backend type 'ftp' "
     "(expected one of localfs, localdisk, oss, s3, registry)"),
    (v1('{"type": "http-proxy", "config": {"addr": "http://x"}}'),
     "device.backend.type: unsupported backend type 'http-proxy' (only in v2 configs) "
     "(expected one of localfs, localdisk, oss, s3, registry)"),
    (v1('{"type": "registry"}'), "device.backend.config: required field is missing"),
    (v1('{"type": "registry", "config": {"host": "h", "repo": "r", "timeout": "5"}}'),
     "device.backend.config.timeout: expected an integer, got string"),
    (v1('{"type": "registry", "config": {"host": "h", "repo": "r", "retry_limit": 256}}'),
     "device.backend.config.retry_limit: must be <= 255, got 256"),
    (v1('{"type": "registry", "config": {"host": "h", "repo": "r", "connect_timeout": -1}}'),
     "device.backend.config.connect_timeout: must be >= 0, got -1"),
    (v1('{"type": "registry", "config": {"host": "h", "repo": "r", "proxy": {"fallback": "yes"}}}'),
     "device.backend.config.proxy.fallback: expected a boolean, got string"),
    (v1('{"type": "oss", "config": {"endpoint": "e"}}'),
     "device.backend.config.bucket_name: required field is missing"),
    (v1('{"type": "s3", "config": {"endpoint": "", "bucket_name": "b", "region": ""}}'),
     "device.backend.config.region: required field is empty"),
    (v1('{"type": "localfs", "config": {"readahead": true}}'),
     "device.backend.config.dir: required field is empty (set dir or blob_file)"),
    (v1('{"type": "localdisk", "config": {}}'), "device.backend.config.device_path: required field is empty"),
    (v1('{"type": "localfs", "config": {"dir": "/b", "alt_dirs": ["/c", 7]}}'),
     "device.backend.config.alt_dirs.1: expected a string, got integer"),
    (json.dumps({**json.loads(v1()), "device": {"backend": {"type": "localfs", "config": {"dir": "/b"}},
                                                 "cache": {"type": "memcache"}}}),
     "device.cache.type: unsupported cache type 'memcache'"),
    (json.dumps({**json.loads(v1()), "device": {"backend": {"type": "localfs", "config": {"dir": "/b"}},
                                                "cache": {"type": "blobcache", "config": {"work_dir": ""}}}}),
     "device.cache.config.work_dir: required field is empty"),
    (json.dumps({**json.loads(v1()), "device": {"backend": {"type": "localfs", "config": {"dir": "/b"}},
                                                 "cache": {"type": "fscache", "config": "/c"}}}),
     "device.cache.config: expected an object, got string"),
    (v1(mode="lazy"), "mode: must be 'direct' or 'cached', got 'lazy'"),
    (v1(digest_validate="yes"), "digest_validate: expected a boolean, got string"),
    (v1(amplify_io=0x10000001), "amplify_io: must be <= 0x10000000, got 268435457"),
    (v1(fs_prefetch={"enable": True, "threads_count": 0}),
     "fs_prefetch.threads_count: must be in 1..1024, got 0"),
    (v1(fs_prefetch={"enable": True, "threads_count": 1025}),
     "fs_prefetch.threads_count: must be in 1..1024, got 1025"),
    (v1(fs_prefetch={"enable": True, "merging_size": 0x10000001}),
     "fs_prefetch.merging_size: must be <= 0x10000000, got 268435457"),
    (v1(fs_prefetch=[]), "fs_prefetch: expected an object, got array"),
    ('{"version": 3}', "version: must be 2, got 3"),
    ('{"version": "2"}', "version: expected an integer, got string"),
    ('{"version": 2, "backend": {"type": "registry"}}',
     "backend.registry: required for backend type 'registry'"),
    ('{"version": 2, "backend": {"localfs": {"dir": "/b"}}}', "backend.type: required field is missing"),
    ('{"version": 2, "backend": {"type": "nfs"}}',
     "backend.type: unsupported backend type 'nfs' (expected one of localfs, localdisk, oss, s3, registry, "
     "http-proxy)"),
    ('{"version": 2, "backend": {"type": "http-proxy", "http-proxy": {"addr": "tcp://127.0.0.1:1"}}}',
     "backend.http-proxy.addr: must be an http:// or https:// URL or the absolute path of an existing unix "
     "socket, got 'tcp://127.0.0.1:1'"),
    ('{"version": 2, "cache": {"type": "blobcache"}}',
     "cache.filecache: required for cache type 'blobcache'"),
    ('{"version": 2, "cache": {"type": "fscache", "fscache": {"work_dir": ""}}}',
     "cache.fscache.work_dir: required field is empty"),
    ('{"version": 2, "cache": {"prefetch": {"enable": true, "batch_size": 268435457}}}',
     "cache.prefetch.batch_size: must be <= 0x10000000, got 268435457"),
    ('version = 2\n[rafs.prefetch]\nenable = true\nthreads = 0\n',
     "rafs.prefetch.threads: must be in 1..1024, got 0"),
    ('version = 2\n[rafs]\nmode = "cached"\nbatch_size = true\n',
     "rafs.batch_size: expected an integer, got boolean"),
    ('version = 2\n[overlay]\nupper_dir = "/u"\n', "overlay.work_dir: required field is missing"),
    ('version = 2\nrafs = "direct"\n', "rafs: expected an object, got string"),
    ('{"device": {"backend": {"type": "localfs", "config": {"dir": "/b"}}}, "mode": "direct",}',
     "config: invalid JSON: Expecting property name enclosed in double quotes (line 1, column 88)"),
    ('version = 2\nid = \n', "config: neither JSON nor valid TOML: Invalid value (at line 2, column 6)"),
    ("[1, 2]", "config: expected an object, got array"),
    ('{"device": {} /* unterminated', "config: invalid JSON: Expecting ',' delimiter (line 1, column 15)"),
    (v1('{"type": ["registry"], "config": {}}'), "device.backend.type: expected a string, got array"),
    (" " * (MAX_CONFIG_SIZE + 1), f"config: size exceeds the limit of {MAX_CONFIG_SIZE} bytes"),
    # a NUL byte in any string (paths, names, hosts, secrets) is refused before anything uses it
    (json.dumps({**json.loads(v1()), "device": {"backend": {"type": "localfs", "config": {"dir": "/b"}},
                                                "cache": {"type": "blobcache",
                                                          "config": {"work_dir": "/tmp/c\0c"}}}}),
     "device.cache.config.work_dir: must not contain a NUL byte"),
    (v1('{"type": "localfs", "config": {"dir": "/tmp/b\\u0000b"}}'),
     "device.backend.config.dir: must not contain a NUL byte"),
    (v1('{"type": "localfs", "config": {"blob_file": "/b\\u0000"}}'),
     "device.backend.config.blob_file: must not contain a NUL byte"),
    (v1('{"type": "localfs", "config": {"dir": "/b", "alt_dirs": ["/c", "/d\\u0000"]}}'),
     "device.backend.config.alt_dirs.1: must not contain a NUL byte"),
    (v1('{"type": "localdisk", "config": {"device_path": "\\u0000/dev/sda"}}'),
     "device.backend.config.device_path: must not contain a NUL byte"),
    (v1('{"type": "registry", "config": {"host": "h\\u0000", "repo": "r"}}'),
     "device.backend.config.host: must not contain a NUL byte"),
    (v1('{"type": "registry", "config": {"host": "h", "repo": "r\\u0000"}}'),
     "device.backend.config.repo: must not contain a NUL byte"),
    (v1('{"type": "registry", "config": {"host": "h", "repo": "r", "auth": "YTpi\\u0000"}}'),
     "device.backend.config.auth: must not contain a NUL byte"),
    (v1('{"type": "registry", "config": {"host": "h", "repo": "r", "ca_cert_files": ["/ca\\u0000"]}}'),
     "device.backend.config.ca_cert_files.0: must not contain a NUL byte"),
    (v1('{"type": "registry", "config": {"host": "h", "repo": "r", "proxy": {"url": "http://p\\u0000"}}}'),
     "device.backend.config.proxy.url: must not contain a NUL byte"),
    (v1('{"type": "oss", "config": {"endpoint": "e", "bucket_name": "b", "object_prefix": "p/\\u0000"}}'),
     "device.backend.config.object_prefix: must not contain a NUL byte"),
    (json.dumps({**json.loads(v1()), "device": {"id": "i\0", "backend": {"type": "localfs",
                                                                          "config": {"dir": "/b"}}}}),
     "device.id: must not contain a NUL byte"),
    ('{"version": 2, "backend": {"type": "http-proxy", "http-proxy": {"addr": "/run/p\\u0000.sock"}}}',
     "backend.http-proxy.addr: must not contain a NUL byte"),
    ('{"version": 2, "backend": {"type": "s3", "s3": {"endpoint": "", "bucket_name": "b", '
     '"region": "r\\u0000"}}}',
     "backend.s3.region: must not contain a NUL byte"),
    ('{"version": 2, "cache": {"type": "fscache", "fscache": {"work_dir": "/f\\u0000"}}}',
     "cache.fscache.work_dir: must not contain a NUL byte"),
    ('version = 2\n[overlay]\nupper_dir = "/u\\u0000"\nwork_dir = "/w"\n',
     "overlay.upper_dir: must not contain a NUL byte"),
    ('version = 2\nid = "a\\u0000"\n', "id: must not contain a NUL byte"),
]


@pytest.mark.parametrize(("text", "message"), MALFORMED, ids=[m[:60] for _, m in MALFORMED])
def test_malformed_config_is_rejected_with_the_field_path(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(text)
    assert info.value.message == message
    assert info.value.field == message.split(":", 1)[0]
    assert info.value.http_status == 400


def test_models_built_in_code_are_validated_too() -> None:
    with pytest.raises(ConfigError, match=r"^rafs.mode: must be 'direct' or 'cached', got 'x'"):
        ConfigV2(rafs=RafsConfig(mode="x"))
    with pytest.raises(ConfigError, match=r"^backend.s3: required for backend type 's3'"):
        ConfigV2(backend=BackendConfig(type="s3", oss=OssConfig(endpoint="e", bucket_name="b")))
    with pytest.raises(ConfigError, match=r"^backend.localfs.alt_dirs.1: must not contain a NUL byte \("):
        ConfigV2(backend=BackendConfig(type="localfs",
                                       localfs=LocalFsConfig(dir="/b", alt_dirs=("/c", "\0"))))
    with pytest.raises(ConfigError, match=r"^cache.filecache.encryption_key: must not contain a NUL byte \("):
        ConfigV2(cache=CacheConfig(type="blobcache", filecache=FileCacheConfig(encryption_key="k\0")))
    cfg = ConfigV2(backend=BackendConfig(type="s3", s3=S3Config(endpoint="", bucket_name="b", region="r")))
    with pytest.raises(ValidationError, match="frozen"):
        cfg.id = "x"  # type: ignore[misc]


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2, 2**40) | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6)


def _leaf_paths(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(node, dict):
        return [path] + [p for k, v in node.items() for p in _leaf_paths(v, path + (k,))]
    return [path]


@pytest.mark.allow_logs  # random replacement objects carry unknown keys
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_validation_error_never_escapes(data: st.DataObject) -> None:
    doc = json.loads(strip_json_comments(SEED))
    if data.draw(st.booleans()):
        doc = load_config(SEED).to_dict(redact=False)
    paths = [p for p in _leaf_paths(doc) if p]
    target = data.draw(st.sampled_from(paths))
    node = doc
    for key in target[:-1]:
        node = node[key]
    if data.draw(st.booleans()):
        del node[target[-1]]
    else:
        node[target[-1]] = data.draw(JSON_VALUES)
    try:
        cfg = load_config(json.dumps(doc))
    except ConfigError as e:
        assert e.message.startswith(f"{e.field}: ")
    else:
        assert isinstance(cfg, ConfigV2)


# ------------------------------------------------------------------------------- unknown keys
def test_unknown_keys_are_accepted_and_warned_once_each(logs: Any) -> None:
    doc = json.loads(v1('{"type": "registry", "config": {"host": "h", "repo": "r", "colour": "blue", '
                        '"proxy": {"url": "", "shiny": 1}}}'))
    doc["device"]["cache"] = {"type": "blobcache", "config": {"work_dir": "/c", "size_gb": 3}}
    doc["turbo"] = True
    with logs.expect("config_key_ignored", count=4):
        cfg = load_config(json.dumps(doc))
    assert cfg.backend is not None and cfg.backend.sub.host == "h"
    warned = sorted(e["key"] for e in logs.events("warning"))
    assert warned == ["device.backend.config.colour", "device.backend.config.proxy.shiny",
                      "device.cache.config.size_gb", "turbo"]


def test_unknown_v2_keys_are_warned_with_their_v2_path(logs: Any) -> None:
    text = 'version = 2\nflavour = 1\n[backend]\ntype = "localfs"\n[backend.localfs]\ndir = "/b"\nspeed = 2\n'
    with logs.expect("config_key_ignored", count=2):
        load_config(text)
    assert sorted(e["key"] for e in logs.events("warning")) == ["backend.localfs.speed", "flavour"]


def snapshotter_config(**backend: Any) -> dict[str, Any]:
    """What nydus-snapshotter marshals (interfaces.md §4.8, Go struct order, omitempty applied)."""
    config = {"readahead": False, "host": "127.0.0.1:5000", "repo": "library/busybox",
              "auth": "dXNlcjpwYXNz", "blob_url_scheme": "http", "blob_redirected_host": "127.0.0.1:5001",
              "scheme": "https", "skip_verify": True, "ca_cert_files": ["/etc/ssl/ca.pem"],
              "proxy": {"url": "http://127.0.0.1:65001", "fallback": False,
                        "ping_url": "http://127.0.0.1:40901/server/ping", "check_interval": 5,
                        "use_http": True},
              "timeout": 5, "connect_timeout": 5, "retry_limit": 2, "readahead_sec": 10, **backend}
    return {"device": {"id": "/123", "backend": {"type": "registry", "config": config},
                       "cache": {"type": "blobcache", "compressed": True,
                                 "config": {"work_dir": "/var/lib/nydus/cache",
                                            "disable_indexed_map": False}}},
            "mode": "direct", "digest_validate": False, "iostats_files": True, "enable_xattr": True,
            "access_pattern": True, "latest_read_files": True, "amplify_io": 1048576,
            "fs_prefetch": {"enable": True, "prefetch_all": True, "threads_count": 8,
                            "merging_size": 1048576, "bandwidth_rate": 1048576, "stream_prefetch": True},
            "warmup": 4096, "id_mapping": [0, 100000, 65536]}


def test_snapshotter_generated_config_loads_without_warnings(logs: Any) -> None:
    # keys nydusd ignores on purpose are logged at debug level only (the fixture fails on warnings)
    with logs.expect("config_key_ignored", count=4):
        cfg = load_config(json.dumps(snapshotter_config()))
    quiet = sorted(e["key"] for e in logs.events("debug") if e["event"] == "config_key_ignored")
    assert quiet == ["device.backend.config.readahead", "device.backend.config.readahead_sec",
                     "id_mapping", "warmup"]
    assert cfg.id == "/123" and cfg.backend is not None and cfg.rafs is not None
    reg = cfg.backend.sub
    assert (reg.blob_redirected_host, reg.skip_verify, reg.ca_cert_files) == ("127.0.0.1:5001", True,
                                                                              ("/etc/ssl/ca.pem",))
    assert reg.proxy == ProxyConfig(url="http://127.0.0.1:65001", fallback=False, use_http=True,
                                    ping_url="http://127.0.0.1:40901/server/ping")
    assert cfg.rafs.prefetch.stream_prefetch and cfg.rafs.prefetch.bandwidth_limit == 1048576
    assert cfg.cache.compressed and cfg.rafs.access_pattern and cfg.rafs.latest_read_files


def test_snapshotter_union_struct_keys_of_other_backends_are_quiet(logs: Any) -> None:
    # one Go struct serves every backend: oss keys next to a registry config are not news
    doc = snapshotter_config(endpoint="oss.example", bucket_name="b", region="r", mirrors=[])
    with logs.expect("config_key_ignored", count=8):
        load_config(json.dumps(doc))
    assert logs.events("warning") == []


# ------------------------------------------------------------------------------ // comments
def test_comments_are_stripped_outside_strings_only() -> None:
    text = '''{ // line comment with "quotes"
      "device": {"id": "a//b /* not a comment */ \\" // still a string",
        /* block
           comment */ "backend": {"type": "registry", "config": {"host": "h", "repo": "r",
          "proxy": {"url": "http://127.0.0.1:65001"}}}},  // trailing
      "mode": "direct"
    }'''
    cfg = load_config(text)
    assert cfg.id == 'a//b /* not a comment */ " // still a string'
    assert cfg.backend is not None and cfg.backend.sub.proxy.url == "http://127.0.0.1:65001"
    assert strip_json_comments('{"a": 1} /* x\ny */').count("\n") == 1  # line numbers survive


def test_comment_only_affects_json_and_line_numbers_stay_right() -> None:
    with pytest.raises(ConfigError, match=r"^config: invalid JSON: .*\(line 3, column"):
        load_config('{\n  // comment\n  "device": {} "mode": "direct"\n}')
    # '#' comments belong to TOML and keep working there; '//' in a TOML string is data
    cfg = load_config('# v2\nversion = 2\nid = "x//y" # trailing\n')
    assert cfg.id == "x//y"


# --------------------------------------------------------------------------- IMAGE_PULL_AUTH
AUTH = base64.b64encode(b"alice:s3cr:et").decode()


def test_image_pull_auth_overrides_the_registry_auth(logs: Any) -> None:
    cfg = load_config(SEED)
    new = apply_image_pull_auth(cfg, {"IMAGE_PULL_AUTH": AUTH, "PATH": "/bin"})
    assert new.backend is not None and new.backend.sub.auth == AUTH
    assert cfg.backend is not None and cfg.backend.sub.auth == "<base64_encoded_auth>"  # untouched
    assert new.model_copy(update={"backend": cfg.backend}) == cfg  # nothing else changed
    # upstream hands the result on as a v2 JSON document: it must survive that trip
    again = load_config(new.to_json(redact=False))
    assert again == new and logs.count("registry_auth_overridden") == 1


def test_image_pull_auth_supplies_missing_auth_in_v2() -> None:
    cfg = load_config("version = 2\n[backend]\ntype = 'registry'\n"
                      "[backend.registry]\nhost = 'h'\nrepo = 'r'\n")
    assert cfg.backend is not None and cfg.backend.sub.auth is None
    assert attr(apply_image_pull_auth(cfg, {"IMAGE_PULL_AUTH": AUTH}), "backend.sub.auth") == AUTH


@pytest.mark.parametrize("env", [{}, {"IMAGE_PULL_AUTH": ""}])
def test_image_pull_auth_unset_or_empty_changes_nothing(env: dict[str, str]) -> None:
    cfg = load_config(SEED)
    assert apply_image_pull_auth(cfg, env) is cfg


def test_image_pull_auth_ignored_without_registry() -> None:
    cfg = load_config_file(CONFIG_DIR / "nydusd-config.localfs.json")
    assert apply_image_pull_auth(cfg, {"IMAGE_PULL_AUTH": AUTH}) is cfg


@pytest.mark.parametrize("value", ["not base64!", base64.b64encode(b"no-colon").decode(),
                                   base64.b64encode(b"\xff\xfe:x").decode()])
def test_image_pull_auth_must_be_base64_user_colon_password(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        apply_image_pull_auth(load_config(SEED), {"IMAGE_PULL_AUTH": value})
    assert info.value.message == "IMAGE_PULL_AUTH: expected base64 of 'user:password'"
    assert value not in str(info.value)  # never echo a credential


# ----------------------------------------------------------------------------- serialised form
def test_serialised_form_is_the_full_v2_struct_without_secrets() -> None:
    cfg = load_config(V1)
    out = json.loads(cfg.to_json())
    assert list(out) == ["version", "id", "backend", "external_backends", "cache", "rafs", "overlay"]
    assert out["overlay"] is None and out["external_backends"] == []
    assert set(out["backend"]) == {"type", "localfs", "localdisk", "oss", "s3", "registry", "http-proxy"}
    assert out["backend"]["registry"] is None and out["backend"]["http-proxy"] is None
    assert out["backend"]["oss"]["access_key_id"] == "" and out["backend"]["oss"]["access_key_secret"] == ""
    assert out["backend"]["oss"]["proxy"]["fallback"] is False
    assert out["cache"]["validate"] is False and out["rafs"]["validate"] is True
    assert out["rafs"]["prefetch"]["threads"] == 3 and out["cache"]["filecache"]["work_dir"] == "/tmp/c"
    seed = json.loads(load_config(SEED).to_json())["backend"]["registry"]
    assert seed["auth"] is None and seed["registry_token"] is None and seed["host"] == "my-registry:5000"
    s3 = load_config_file(CONFIG_DIR / "nydusd-config.s3.json")
    assert "testing" not in s3.to_json() and "testing" in s3.to_json(redact=False)
    assert "test-access-key" not in repr(load_config_file(CONFIG_DIR / "nydusd-config.oss.json"))
    assert load_config(cfg.to_json(redact=False)) == cfg


NAMES = st.text(st.sampled_from("abcxyz0129-_/:."), min_size=1, max_size=12)
TEXT = st.characters(blacklist_characters="\0")  # any character a config string may hold
COUNTS = st.integers(0, 2**32 - 1)
PREFETCH = st.builds(PrefetchConfig, enable=st.booleans(), threads=st.integers(1, 1024),
                     batch_size=st.integers(0, 0x10000000), bandwidth_limit=COUNTS,
                     prefetch_all=st.booleans(), stream_prefetch=st.booleans())
PROXY = st.builds(ProxyConfig, url=st.text(TEXT, max_size=8), fallback=st.booleans(), check_interval=COUNTS)
BACKENDS = st.one_of(
    st.builds(lambda d, a: BackendConfig(type="localfs", localfs=LocalFsConfig(dir=d, alt_dirs=a)),
              NAMES, st.lists(NAMES, max_size=2).map(tuple)),
    st.builds(lambda h, r, auth, p, t, n: BackendConfig(type="registry", registry=RegistryConfig(
        host=h, repo=r, auth=auth, proxy=p, timeout=t, retry_limit=n)),
        NAMES, NAMES, st.none() | NAMES, PROXY, COUNTS, st.integers(0, 255)),
    st.builds(lambda e, b, r, k: BackendConfig(type="s3", s3=S3Config(endpoint=e, bucket_name=b, region=r,
                                                                     access_key_id=k)),
              st.text(TEXT, max_size=5), NAMES, NAMES, st.text(TEXT, max_size=5)),
    st.builds(lambda e, b, p: BackendConfig(type="oss", oss=OssConfig(endpoint=e, bucket_name=b, proxy=p)),
              NAMES, NAMES, PROXY),
    st.builds(lambda d, g: BackendConfig(type="localdisk", localdisk=LocalDiskConfig(device_path=d,
                                                                                     disable_gpt=g)),
              NAMES, st.booleans()),
    st.builds(lambda a, p: BackendConfig(type="http-proxy", http_proxy=HttpProxyConfig(addr=a, path=p)),
              st.sampled_from(["http://127.0.0.1:1", "https://h"]), st.text(TEXT, max_size=5)),
)
CACHES = st.one_of(
    st.builds(lambda p: CacheConfig(prefetch=p), PREFETCH),
    st.builds(lambda t, w, c, p: CacheConfig(type=t, compressed=c, filecache=FileCacheConfig(work_dir=w),
                                             prefetch=p),
              st.sampled_from(["blobcache", "filecache"]), NAMES, st.booleans(), PREFETCH),
)
CONFIGS = st.builds(ConfigV2, id=st.text(TEXT, max_size=6), backend=st.none() | BACKENDS, cache=CACHES,
                    overlay=st.none() | st.builds(OverlayConfig, upper_dir=NAMES, work_dir=NAMES),
                    rafs=st.none() | st.builds(RafsConfig, mode=st.sampled_from(["direct", "cached"]),
                                               batch_size=st.integers(0, 0x10000000), validate=st.booleans(),
                                               prefetch=PREFETCH))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cfg=CONFIGS)
def test_serialised_form_round_trips(cfg: ConfigV2, logs: Any) -> None:
    assert load_config(cfg.to_json(redact=False)) == cfg


# ------------------------------------------------------------------------------- files, helpers
def test_load_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^config: cannot read .*/absent.json: No such file or directory"):
        load_config_file(tmp_path / "absent.json")
    big = tmp_path / "big.json"
    big.write_text("{}" + " " * MAX_CONFIG_SIZE)
    with pytest.raises(ConfigError, match=r"^config: size exceeds the limit of 1048576 bytes \("):
        load_config_file(big)
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'{"version": 2, "id": "caf\xe9"}')
    with pytest.raises(ConfigError, match=r"^config: not UTF-8 text \(byte 25\) \("):
        load_config_file(latin)
    with pytest.raises(ConfigError, match=(
            r"^config: cannot read '.*/a\\x00b': path contains a NUL byte \(field=config\)$")):
        load_config_file(f"{tmp_path}/a\0b")


@pytest.mark.parametrize(("doc", "field"), [
    ({"device": {"backend": {"type": "localfs", "config": {"dir": "/b"}},
                 "cache": {"type": "blobcache", "config": {"work_dir": "/tmp/c\0c"}}}, "mode": "direct"},
     "device.cache.config.work_dir"),
    ({"device": {"backend": {"type": "localfs", "config": {"dir": "/tmp/b\0b"}}}, "mode": "direct"},
     "device.backend.config.dir"),
])
def test_nydusd_refuses_a_nul_path_with_one_error_line(tmp_path: Path, doc: dict[str, Any],
                                                       field: str) -> None:
    """The real daemon command: a clean exit 2 naming the field, no traceback, nothing mounted."""
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(doc))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.run([sys.executable, "-m", "nydusd", "--config", str(cfg), "--mountpoint", str(mnt),
                           "--bootstrap", str(tmp_path / "image.boot")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"nydusd: error: {field}: must not contain a NUL byte" in proc.stderr
    assert not os.path.ismount(mnt)


def test_backend_sub_and_cache_kind_helpers() -> None:
    cfg = load_config_file(CONFIG_DIR / "nydusd-config.v2.json")
    assert cfg.backend is not None and cfg.backend.sub is cfg.backend.http_proxy
    assert cfg.cache.kind == "filecache" and cfg.cache.work_dir == "/var/lib/nydus/cache"
    fs = load_config('{"version": 2, "cache": {"type": "fscache", "fscache": {"work_dir": "/f"}}}')
    assert (fs.cache.kind, fs.cache.work_dir, fs.backend, fs.rafs) == ("fscache", "/f", None, None)
    dummy = load_config('{"version": 2, "cache": {"type": "dummycache"}}')
    assert (dummy.cache.kind, dummy.cache.work_dir) == ("dummy", "")


def test_chunk_validation_is_cache_validate_or_rafs_validate() -> None:
    assert load_config_file(CONFIG_DIR / "nydusd-config.oss.json").chunk_validation  # digest_validate
    assert load_config_file(CONFIG_DIR / "nydusd-config.blobcache-prefetch.json").chunk_validation
    assert not load_config(SEED).chunk_validation


def test_http_proxy_accepts_an_existing_unix_socket_path(tmp_path: Path) -> None:
    path = tmp_path / "proxy.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        doc = {"version": 2, "backend": {"type": "http-proxy", "http-proxy": {"addr": str(path)}}}
        cfg = load_config(json.dumps(doc))
    assert cfg.backend is not None and cfg.backend.sub.addr == str(path)
    doc["backend"]["http-proxy"]["addr"] = str(tmp_path / "absent.sock")
    with pytest.raises(ConfigError, match=r"^backend.http-proxy.addr: must be an http:// or https:// URL"):
        load_config(json.dumps(doc))


def test_escaped_quotes_and_backslashes_do_not_confuse_comment_stripping() -> None:
    text = '{"a": "c:\\\\", // comment "x"\n "b": "q\\"//", /* "c": 1 */ "d": "/*"}'
    assert json.loads(strip_json_comments(text)) == {"a": "c:\\", "b": 'q"//', "d": "/*"}


@pytest.mark.parametrize("kind", ["registry", "oss", "s3", "http-proxy"])
def test_proxy_url_credentials_are_masked_in_the_serialised_form(kind: str) -> None:
    sub: dict[str, Any] = {"registry": {"host": "r:5000", "repo": "a/b"},
                           "oss": {"endpoint": "e", "bucket_name": "b"},
                           "s3": {"endpoint": "e", "bucket_name": "b", "region": "r"},
                           "http-proxy": {"addr": "http://u:addr-pw@origin:80"}}[kind]
    sub["proxy"] = {"url": "http://nydus:proxy-pw@127.0.0.1:65001", "fallback": True}
    cfg = load_config(json.dumps({"version": 2, "backend": {"type": kind, kind: sub}}))
    shown = cfg.to_json()
    assert "proxy-pw" not in shown and "addr-pw" not in shown
    assert json.loads(shown)["backend"][kind]["proxy"]["url"] == "http://nydus:***@127.0.0.1:65001"
    assert "proxy-pw" in cfg.to_json(redact=False)


@pytest.mark.parametrize(("text", "shown"), [
    ("http://u:pw@h:1/x", "http://u:***@h:1/x"),
    ("via https://token@h/v2 and http://a:b%40c@h2 mail@example.com",
     "via https://***@h/v2 and http://a:***@h2 mail@example.com"),
    ("http://u:p@ss@h/x@y", "http://u:***@h/x@y"),
    ("proxy='http://u:pw@h:3'", "proxy='http://u:***@h:3'"),
    ("http://h/path@x", "http://h/path@x"),
])
def test_redact_credentials(text: str, shown: str) -> None:
    from nydusd.errors import BackendError, redact_credentials

    assert redact_credentials(text) == shown
    err = BackendError(f"failed: {text}", proxy=text)
    assert str(err) == f"failed: {shown} (proxy={shown})"


_USERINFO_CHARS = st.characters(codec="ascii", categories=("L", "N"), include_characters="-._~!$&'()*+,;=%@:")


@settings(max_examples=300, deadline=None)
@given(user=st.text(_USERINFO_CHARS.filter(lambda c: c not in "@:"), min_size=1, max_size=12),
       password=st.text(_USERINFO_CHARS, min_size=4, max_size=24),
       wrap=st.sampled_from(["{}", "proxy={}", "'{}'", '"{}"', "GET {}/v2/x failed", "({}) a@b",
                             '{{"url": "{}", "x": "y@z"}}']))
def test_credentials_never_survive_redaction(user: str, password: str, wrap: str) -> None:
    """Fuzz: whatever the password (userinfo characters, raw '@' and ':' included) and wherever the
    URL sits in a text, the password is gone from error texts, the serialised config and log values."""
    from nydusd.errors import BackendError, redact_credentials
    from nydusd.log import redact_event

    url = f"http://{user}:{password}@127.0.0.1:65001"
    text = wrap.format(url)
    # a password that is also a part of the surrounding text cannot be told apart from it
    assume(password not in wrap.format(f"http://{user}:***@127.0.0.1:65001"))
    assert password not in redact_credentials(text).replace(f"{user}:***", "")
    assert password not in str(BackendError(text, proxy=url)).replace(f"{user}:***", "")
    event = redact_event(None, "warning", {"event": "x", "cause": text, "exc": ValueError(text)})
    assert password not in repr(event).replace(f"{user}:***", "")
    def config(proxy: str) -> Any:
        return load_config(json.dumps({"version": 2, "backend": {"type": "registry", "registry": {
            "host": "r", "repo": "a/b", "proxy": {"url": proxy}}}}))

    shown = config(url).to_json()
    assert shown == config(f"http://{user}:***@127.0.0.1:65001").to_json()
