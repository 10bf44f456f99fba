"""`nydusify copy` against real docker-registry instances: a converted nydus image (bootstrap layer
and every data blob) copied within a registry (cross-repo mount), across registries (one with
htpasswd auth), out to a local OCI layout directory or tar and back in. Each copy passes
`nydusify check` against the OCI source, which reads every file through the copied blobs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from nydusd.converter import manifest as m
from nydusd.oci import mediatypes as mtypes
from tests.converter.conftest import Image, docker_config
from tests.converter.test_convert import check, convert, get_manifest
from tests.harness.oci_registry import Registry

NYDUSIFY = str(Path(sys.executable).parent / "nydusify")


def nydusify_copy(tmp: Path, *args: str,
                  env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([NYDUSIFY, "copy", "--source-insecure", "--target-insecure", "--work-dir",
                           str(tmp / "work"), *args], capture_output=True, text=True, timeout=300, cwd=tmp,
                          env={**os.environ, "HOME": str(tmp / "nohome"), **(env or {})})


@pytest.fixture(scope="module")
def nydus_image(registry: Registry, source_image: Image, tmp_path_factory: pytest.TempPathFactory) -> str:
    ref = f"{registry.host}/nydus/texture:v1"
    convert(source_image.ref, ref, tmp_path_factory.mktemp("conv"))
    return ref


def layers_of(registry: Registry, repo: str, tag: str) -> tuple[str, list[m.Descriptor]]:
    raw, ctype = get_manifest(registry, repo, tag)
    doc = m.parse_document(raw, ctype)
    assert isinstance(doc, m.Manifest)
    return m.digest_of(raw), doc.layers


def test_copy_within_and_across_registries(registry: Registry, auth_registry: Registry,
                                           source_image: Image, nydus_image: str, tmp_path: Path) -> None:
    want_digest, layers = layers_of(registry, "nydus/texture", "v1")
    assert sum(1 for d in layers if d.mediaType == mtypes.NYDUS_BLOB) >= 3  # every data blob is a layer
    r = nydusify_copy(tmp_path, "--source", nydus_image, "--target", f"{registry.host}/copy/texture:v1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"copied {nydus_image} -> {registry.host}/copy/texture:v1 ({want_digest}): ")
    assert layers_of(registry, "copy/texture", "v1")[0] == want_digest
    assert check(f"{registry.host}/copy/texture:v1", source_image.ref, tmp_path / "c1") == []

    env = docker_config(tmp_path / "home", auth_registry.host, "user", "pass")
    dst = f"{auth_registry.host}/copy/texture:v1"
    r = nydusify_copy(tmp_path, "--source", nydus_image, "--target", dst, env=env)
    assert r.returncode == 0, r.stderr
    assert f"{len(layers) + 1} blob(s) copied" in r.stdout  # layers + config, streamed across
    assert check(dst, source_image.ref, tmp_path / "c2", env=env) == []
    again = nydusify_copy(tmp_path, "--source", nydus_image, "--target", dst, env=env)
    assert again.returncode == 0
    assert f"0 blob(s) copied (0 bytes), {len(layers) + 1} already there" in again.stdout


@pytest.mark.parametrize("local", ["layout", "layout.tar"])
def test_copy_out_to_a_local_layout_and_back(registry: Registry, source_image: Image, nydus_image: str,
                                             tmp_path: Path, local: str) -> None:
    want_digest, layers = layers_of(registry, "nydus/texture", "v1")
    out = f"file://{tmp_path / local}"
    r = nydusify_copy(tmp_path, "--source", nydus_image, "--target", out)
    assert r.returncode == 0, r.stderr
    if local.endswith(".tar"):
        with tarfile.open(tmp_path / local) as tar:
            names = set(tar.getnames())
            index = json.load(tar.extractfile("index.json"))  # type: ignore[arg-type]
        assert {"oci-layout", "index.json"} <= names
        assert {f"blobs/sha256/{d.digest[7:]}" for d in layers} <= names
        assert not (tmp_path / "work").exists() or os.listdir(tmp_path / "work") == []
    else:
        index = json.loads((tmp_path / local / "index.json").read_text())
        for d in layers:
            blob = tmp_path / local / "blobs" / "sha256" / d.digest[7:]
            assert m.digest_of(blob.read_bytes()) == d.digest
    names = [(e["digest"], e["annotations"]["org.opencontainers.image.ref.name"]) for e in index["manifests"]]
    assert names == [(want_digest, "v1")]
    back = f"{registry.host}/back-{local.replace('.', '-')}/texture:v1"
    r = nydusify_copy(tmp_path, "--source", out, "--target", back)
    assert r.returncode == 0, r.stderr
    assert layers_of(registry, back.split("/", 1)[1].rsplit(":", 1)[0], "v1")[0] == want_digest
    assert check(back, source_image.ref, tmp_path / "c") == []


def test_copy_refuses_a_corrupt_local_blob(registry: Registry, nydus_image: str, tmp_path: Path) -> None:
    _, layers = layers_of(registry, "nydus/texture", "v1")
    local = f"file://{tmp_path / 'l'}"
    assert nydusify_copy(tmp_path, "--source", nydus_image, "--target", local).returncode == 0
    blob = tmp_path / "l" / "blobs" / "sha256" / layers[0].digest[7:]
    blob.write_bytes(b"x" + blob.read_bytes()[1:])
    r = nydusify_copy(tmp_path, "--source", local, "--target", f"{registry.host}/bad/t:v1")
    assert r.returncode == 1
    want = f"error: blob digest mismatch in the OCI layout (digest={layers[0].digest})"
    assert r.stderr.splitlines()[-1] == want
    assert "Traceback" not in r.stderr
    r = nydusify_copy(tmp_path, "--source", f"file://{tmp_path / 'none'}",
                      "--target", f"{registry.host}/x/t:v1")
    assert r.returncode == 1 and "not an OCI image layout (no index.json)" in r.stderr


@pytest.mark.parametrize("to_local", [False, True])
def test_copy_takes_blobs_from_the_source_backend(registry: Registry, source_image: Image,
                                                  tmp_path: Path, to_local: bool) -> None:
    """An image converted with --backend-type localfs has only its bootstrap layer in the registry;
    copy with --source-backend-* adds every blob as a layer, so the copy stands on its own."""
    from nydusd.converter.stores import create_store

    blobs = tmp_path / "blobs"
    src = f"{registry.host}/external/texture:v1"
    with create_store("localfs", json.dumps({"dir": str(blobs)})) as store:
        convert(source_image.ref, src, tmp_path / "conv", blob_store=store)
    assert len(layers_of(registry, "external/texture", "v1")[1]) == 1
    backend = ("--source-backend-type", "localfs",
               "--source-backend-config", json.dumps({"dir": str(blobs)}))
    dst = f"{registry.host}/standalone-{int(to_local)}/texture:v1"
    if to_local:
        r = nydusify_copy(tmp_path, "--source", src, "--target", f"file://{tmp_path / 'l'}", *backend)
        assert r.returncode == 0, r.stderr
        r = nydusify_copy(tmp_path, "--source", f"file://{tmp_path / 'l'}", "--target", dst)
    else:
        r = nydusify_copy(tmp_path, "--source", src, "--target", dst, *backend)
    assert r.returncode == 0, r.stderr
    _, layers = layers_of(registry, f"standalone-{int(to_local)}/texture", "v1")
    ids = sorted(p.name for p in blobs.iterdir())
    assert sorted(d.digest[7:] for d in layers if d.mediaType == mtypes.NYDUS_BLOB) == ids and len(ids) >= 3
    assert layers[-1].annotations and layers[-1].annotations.get(mtypes.ANN_NYDUS_BOOTSTRAP) == "true"
    assert check(dst, source_image.ref, tmp_path / "c") == []  # no backend given: all in the registry
    assert not list((tmp_path / "work").glob("copy-blob-*"))
