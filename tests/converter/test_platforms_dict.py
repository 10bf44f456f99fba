"""Multi-platform sources (--platform / --all-platforms / --merge-platform) and chunk dictionaries."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from nydusd.converter import manifest as m
from nydusd.errors import NotFound
from nydusd.oci import mediatypes as mtypes
from nydusd.oci.client import RegistryClient
from tests.converter.test_bad_input import layer_tar, push_image
from tests.converter.test_convert import check, convert, get_manifest
from tests.harness.oci_registry import Registry


def _push_index(registry: Registry, repo: str, tag: str) -> list[m.Descriptor]:
    descs = []
    for arch in ("amd64", "arm64"):
        mf = push_image(registry, repo, f"{tag}-{arch}", [layer_tar([("arch", arch.encode(), ""),
                                                                   ("etc/", b"", "")])], arch=arch)
        raw = m.encode(mf)
        descs.append(m.descriptor_for(mtypes.OCI_MANIFEST, raw,
                                      platform=m.Platform(architecture=arch, os="linux")))
    index = m.Index(mediaType=mtypes.OCI_INDEX, manifests=descs)
    client = RegistryClient(registry.host, repo, scheme="http")
    try:
        client.put_manifest(tag, m.encode(index), mtypes.OCI_INDEX)
    finally:
        client.close()
    return descs


@pytest.fixture(scope="module")
def multi(registry: Registry) -> tuple[str, list[m.Descriptor]]:
    return f"{registry.host}/src/multi:v1", _push_index(registry, "src/multi", "v1")


def test_single_platform_of_an_index_collapses_to_a_manifest(registry: Registry, multi: tuple[str, list],
                                                             tmp_path: Path) -> None:
    src, _ = multi
    convert(src, f"{registry.host}/dst/multi:arm", tmp_path / "w", platform="linux/arm64")
    raw, ctype = get_manifest(registry, "dst/multi", "arm")
    assert ctype == mtypes.OCI_MANIFEST
    assert check(f"{registry.host}/dst/multi:arm", src, tmp_path / "c", platform="linux/arm64") == []
    with pytest.raises(NotFound, match="no manifest in the source index"):
        convert(src, f"{registry.host}/dst/multi:s390", tmp_path / "w2", platform="linux/s390x")


def test_all_platforms_and_merge_platform(registry: Registry, multi: tuple[str, list[m.Descriptor]],
                                          tmp_path: Path) -> None:
    src, originals = multi
    convert(src, f"{registry.host}/dst/multi:all", tmp_path / "a", all_platforms=True)
    raw, ctype = get_manifest(registry, "dst/multi", "all")
    idx = m.parse_document(raw)
    assert ctype == mtypes.OCI_INDEX and isinstance(idx, m.Index)
    assert sorted(d.platform.architecture for d in idx.manifests if d.platform) == ["amd64", "arm64"]
    assert not any(d.digest in {o.digest for o in originals} for d in idx.manifests)
    for arch in ("amd64", "arm64"):
        assert check(f"{registry.host}/dst/multi:all", src, tmp_path / f"c-{arch}",
                     platform=f"linux/{arch}") == []

    convert(src, f"{registry.host}/dst/multi:merged", tmp_path / "b", merge_platform=True)
    raw, _ = get_manifest(registry, "dst/multi", "merged")
    idx = m.parse_document(raw)
    assert isinstance(idx, m.Index) and len(idx.manifests) == 4
    assert [d.digest for d in idx.manifests[:2]] == [o.digest for o in originals]
    assert [m.is_nydus_descriptor(d) for d in idx.manifests] == [False, False, True, True]
    assert all(d.artifactType == mtypes.NYDUS_ARTIFACT for d in idx.manifests[2:])
    # check picks the nydus entries of a merged index (both platforms at once)
    target = f"{registry.host}/dst/multi:merged"
    assert check(target, None, tmp_path / "c-merged") == []


def test_chunk_dict_dedups_across_images(registry: Registry, tmp_path: Path) -> None:
    rng = random.Random(7)
    shared = rng.randbytes(3 << 20)
    push_image(registry, "src/dict-a", "v1", [layer_tar([("lib/", b"", ""), ("lib/shared.so", shared, ""),
                                                         ("a-only", rng.randbytes(100_000), "")])])
    push_image(registry, "src/dict-b", "v1", [layer_tar([("opt/", b"", ""), ("opt/copy.so", shared, ""),
                                                         ("b-only", rng.randbytes(50_000), "")])])
    dict_ref = f"{registry.host}/dict/a:nydus"
    convert(f"{registry.host}/src/dict-a:v1", dict_ref, tmp_path / "a")
    plain = convert(f"{registry.host}/src/dict-b:v1", f"{registry.host}/dst/b:plain", tmp_path / "p")
    deduped = convert(f"{registry.host}/src/dict-b:v1", f"{registry.host}/dst/b:dict", tmp_path / "d",
                      chunk_dict=f"bootstrap:registry:{dict_ref}")
    own_plain = plain.manifests[0].manifest.layers[0].size
    layers = deduped.manifests[0].manifest.layers
    dict_raw, _ = get_manifest(registry, "dict/a", "nydus")
    dict_mf = m.parse_document(dict_raw)
    assert isinstance(dict_mf, m.Manifest)
    # the new blob holds only what the dictionary lacks; the dictionary's blob is appended
    assert len(layers) == 3 and layers[1].digest == dict_mf.layers[0].digest
    assert layers[0].size < own_plain - (2 << 20)
    assert check(f"{registry.host}/dst/b:dict", f"{registry.host}/src/dict-b:v1", tmp_path / "c") == []


def test_local_chunk_dict_and_cross_registry_merge(registry: Registry, multi: tuple[str, list[m.Descriptor]],
                                                   registry_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(8)
    shared = rng.randbytes(2 << 20)
    push_image(registry, "src/ld-a", "v1", [layer_tar([("s", shared, "")])])
    push_image(registry, "src/ld-b", "v1", [layer_tar([("t", shared, ""), ("u", b"u", "")])])
    res = convert(f"{registry.host}/src/ld-a:v1", f"{registry.host}/ld/img:a", tmp_path / "a")
    boot = tmp_path / "dict.boot"
    from nydusd.converter.publish import extract_bootstrap
    from nydusd.converter.remote import open_remote

    remote = open_remote(f"{registry.host}/ld/img:a", plain_http=True)
    try:
        layer = res.manifests[0].manifest.layers[-1]
        boot.write_bytes(extract_bootstrap(remote.get_blob_bytes(layer.digest)))
    finally:
        remote.close()
    # same repository: the dictionary's blob is already there
    b = convert(f"{registry.host}/src/ld-b:v1", f"{registry.host}/ld/img:b", tmp_path / "b",
                chunk_dict=f"bootstrap:local:{boot}")
    assert b.manifests[0].manifest.layers[1].digest == res.manifests[0].manifest.layers[0].digest
    assert check(f"{registry.host}/ld/img:b", f"{registry.host}/src/ld-b:v1", tmp_path / "cb") == []
    # another repository of another registry: a local dictionary's blobs cannot be found there
    with pytest.raises(NotFound, match="chunk dict blob"):
        convert(f"{registry.host}/src/ld-b:v1", f"{registry_server.host}/nydusify-ld/img:b", tmp_path / "x",
                chunk_dict=f"bootstrap:local:{boot}")
    # merge-platform into another registry copies the original manifests and their blobs over
    src, originals = multi
    dst = f"{registry_server.host}/nydusify-merge/multi:v1"
    convert(src, dst, tmp_path / "m", merge_platform=True)
    assert check(dst, None, tmp_path / "cm") == []
    client = RegistryClient(registry_server.host, "nydusify-merge/multi", scheme="http")
    try:
        for o in originals:
            raw, _, digest = client.get_manifest(o.digest)
            assert digest == o.digest
            for layer in m.parse_document(raw).layers:  # type: ignore[union-attr]
                assert client.blob_exists(layer.digest)
    finally:
        client.close()


def test_merge_platform_of_a_single_manifest(registry: Registry, tmp_path: Path) -> None:
    src_mf = push_image(registry, "src/single", "v1", [layer_tar([("f", b"data", "")])], arch="arm64")
    dst = f"{registry.host}/dst/single:merged"
    res = convert(f"{registry.host}/src/single:v1", dst, tmp_path / "w", merge_platform=True)
    raw, ctype = get_manifest(registry, "dst/single", "merged")
    idx = m.parse_document(raw)
    assert ctype == mtypes.OCI_INDEX and isinstance(idx, m.Index) and res.digest == m.digest_of(raw)
    assert [d.digest for d in idx.manifests][0] == m.digest_of(m.encode(src_mf))
    assert [(d.platform.spec() if d.platform else None, d.artifactType) for d in idx.manifests] == [
        ("linux/arm64", None), ("linux/arm64", mtypes.NYDUS_ARTIFACT)]
    assert check(dst, f"{registry.host}/src/single:v1", tmp_path / "c") == []


def test_registry_chunk_dict_from_another_registry(registry: Registry, registry_server,  # type: ignore[no-untyped-def]
                                                   tmp_path: Path) -> None:
    rng = random.Random(9)
    shared = rng.randbytes(3 << 20)
    push_image(registry, "src/xd-a", "v1", [layer_tar([("s", shared, "")])])
    push_image(registry, "src/xd-b", "v1", [layer_tar([("t", shared, ""), ("v", b"v", "")])])
    dict_ref = f"{registry.host}/xd/dict:nydus"
    d = convert(f"{registry.host}/src/xd-a:v1", dict_ref, tmp_path / "a")
    dst = f"{registry_server.host}/nydusify-xd/b:nydus"
    res = convert(f"{registry.host}/src/xd-b:v1", dst, tmp_path / "b",
                  chunk_dict=f"bootstrap:registry:{dict_ref}")
    dict_blob = d.manifests[0].manifest.layers[0]
    layers = res.manifests[0].manifest.layers
    assert layers[1].digest == dict_blob.digest and layers[1].size == dict_blob.size
    client = RegistryClient(registry_server.host, "nydusify-xd/b", scheme="http")
    try:
        assert client.head_blob(dict_blob.digest) == dict_blob.size  # copied over
    finally:
        client.close()
    assert check(dst, f"{registry.host}/src/xd-b:v1", tmp_path / "c") == []
