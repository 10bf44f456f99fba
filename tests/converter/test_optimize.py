"""`nydusify optimize` round trip on a real registry: convert an OCI image, write a prefetch list (or
take a daemon's recorded access pattern), optimize into a new tag; the new bootstrap lists the files
in the given order, shares every data blob with the source and still matches the OCI source."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nydusd.cli.convert import main as nydusify
from nydusd.converter import manifest as m
from nydusd.converter.optimize import (
    ordered_paths,
    parse_prefetch_files,
    paths_in_access_order,
    source_bootstrap,
)
from nydusd.converter.publish import extract_bootstrap
from nydusd.converter.remote import open_remote
from nydusd.errors import InvalidArgument
from nydusd.rafs import load_bootstrap
from tests.converter.conftest import Image
from tests.converter.test_convert import check, convert
from tests.harness.oci_registry import Registry


def nydus_manifest(ref: str) -> tuple[m.Manifest, list[str], list[str]]:
    """Manifest, prefetch table (paths in table order) and regular files (size > 0) of an image."""
    remote = open_remote(ref, plain_http=True)
    try:
        doc, _, layer = source_bootstrap(remote)
    finally:
        remote.close()
    with load_bootstrap(extract_bootstrap(layer)) as sb:
        table = [sb.path_of(i).decode() for i in sb.prefetch_inodes()]
        files = [p.decode() for p, inode in sb.walk() if inode.is_reg and inode.size]
    return doc, table, files


@pytest.fixture(scope="module")
def nydus_image(registry: Registry, source_image: Image, tmp_path_factory: pytest.TempPathFactory) -> str:
    dst = f"{registry.host}/opt/texture:nydus"
    convert(source_image.ref, dst, tmp_path_factory.mktemp("opt-convert"))
    return dst


def test_optimize_writes_the_list_in_order_and_keeps_the_blobs(registry: Registry, source_image: Image,
                                                               nydus_image: str, tmp_path: Path) -> None:
    before, _, files = nydus_manifest(nydus_image)
    assert len(files) >= 3
    wanted = [files[-1], files[0], files[len(files) // 2]]      # not in path order
    listing = tmp_path / "prefetch.files"
    listing.write_text("\n".join([wanted[0], "relative/ignored", wanted[1], wanted[0], "/no/such/file",
                                  wanted[2]]) + "\n")
    target = f"{registry.host}/opt/texture:optimized"
    assert nydusify(["--log-level", "warn", "optimize", "--source", nydus_image, "--target", target,
                     "--plain-http", "--prefetch-files", str(listing)]) == 0
    after, table, files_after = nydus_manifest(target)
    assert table == wanted
    assert files_after == files
    # the data blobs are the source's, only the bootstrap layer and the config are new
    assert [d.digest for d in after.layers[:-1]] == [d.digest for d in before.layers[:-1]]
    assert after.layers[-1].digest != before.layers[-1].digest
    assert after.layers[-1].annotations == before.layers[-1].annotations
    # every file still decodes to the OCI source's bytes
    assert check(target, source_image.ref, tmp_path / "check") == []


def test_optimize_reads_upstreams_json_prefetch_files(registry: Registry, nydus_image: str,
                                                     tmp_path: Path) -> None:
    _, _, files = nydus_manifest(nydus_image)
    wanted = [files[1], files[-1]]
    listing = tmp_path / "prefetch.json"
    listing.write_text(json.dumps({"version": "v1", "files": [
        {"path": wanted[0], "ranges": [[0, 4096], [8192, 4096]]},
        {"path": "relative/skipped", "ranges": None},
        {"path": wanted[1], "ranges": None}]}))
    target = f"{registry.host}/opt/texture:json"
    assert nydusify(["--log-level", "warn", "optimize", "--source", nydus_image, "--target", target,
                     "--plain-http", "--prefetch-files", str(listing)]) == 0
    assert nydus_manifest(target)[1] == wanted


def test_optimize_from_a_recorded_access_pattern(registry: Registry, nydus_image: str,
                                                 tmp_path: Path) -> None:
    remote = open_remote(nydus_image, plain_http=True)
    try:
        _, _, layer = source_bootstrap(remote)
    finally:
        remote.close()
    with load_bootstrap(extract_bootstrap(layer)) as sb:
        regs = [(p.decode(), inode.ino) for p, inode in sb.walk() if inode.is_reg and inode.size][:3]
        dirs = [inode.ino for p, inode in sb.walk() if inode.is_dir]
    # /api/v1/metrics/pattern as nydusd answers it: sorted by inode, order in the timestamps
    pattern = [{"ino": regs[0][1], "nr_read": 3, "first_access_time_secs": 100, "first_access_time_nanos": 7},
               {"ino": regs[1][1], "nr_read": 1, "first_access_time_secs": 99, "first_access_time_nanos": 9},
               {"ino": regs[2][1], "nr_read": 1, "first_access_time_secs": 100, "first_access_time_nanos": 5},
               {"ino": dirs[0], "nr_read": 1, "first_access_time_secs": 1, "first_access_time_nanos": 0},
               {"ino": 999_999, "nr_read": 1, "first_access_time_secs": 1, "first_access_time_nanos": 0}]
    (tmp_path / "pattern.json").write_text(json.dumps(pattern))
    target = f"{registry.host}/opt/texture:replayed"
    assert nydusify(["--log-level", "warn", "optimize", "--source", nydus_image, "--target", target,
                     "--plain-http", "--access-pattern", str(tmp_path / "pattern.json")]) == 0
    _, table, _ = nydus_manifest(target)
    assert table == [regs[1][0], regs[2][0], regs[0][0]]


def test_optimize_refuses_an_oci_image_and_a_bad_list(registry: Registry, source_image: Image, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    listing = tmp_path / "prefetch.files"
    listing.write_text("/bin/tool\n")
    assert nydusify(["optimize", "--source", source_image.ref, "--target", f"{registry.host}/opt/x:y",
                     "--plain-http", "--prefetch-files", str(listing)]) == 1
    assert "not a nydus image" in capsys.readouterr().err
    assert nydusify(["optimize", "--source", source_image.ref, "--target", f"{registry.host}/opt/x:y",
                     "--plain-http", "--prefetch-files", str(tmp_path / "missing")]) == 1
    assert "cannot read the prefetch files" in capsys.readouterr().err


def test_parse_prefetch_files_takes_both_forms_and_refuses_others() -> None:
    assert parse_prefetch_files("/b\n/a\n") == ["/b", "/a"]
    doc = {"version": "v1", "files": [{"path": "/z/1", "ranges": [[0, 1]]}, {"path": "/a"}, {"path": "/z/1"}]}
    assert parse_prefetch_files(json.dumps(doc)) == ["/z/1", "/a"]
    assert parse_prefetch_files('{"version": "v1", "files": []}') == []
    for bad, message in [('{"version": "v2", "files": []}', "unsupported prefetch file"),
                         ('{"version": "v1", "files": [{"ranges": null}]}', "needs a \"path\""),
                         ('{"version": "v1", "files": [', "not valid JSON")]:
        with pytest.raises(InvalidArgument, match=message):
            parse_prefetch_files(bad)


def test_ordered_paths_keeps_the_file_order() -> None:
    assert ordered_paths(["/b", "a", "/a/", "//c/./d", "/b", " /e "]) == ["/b", "/a", "/c/d", "/e"]


def test_paths_in_access_order_skips_what_the_image_lacks(tmp_path: Path) -> None:
    from tests.harness.images import build_daemon_image, sample_tree

    image = build_daemon_image(sample_tree(tmp_path / "src", big=False), tmp_path / "img")
    with load_bootstrap(image.bootstrap) as sb:
        small = sb.resolve("/dir/sub/f001").ino
        leaf = sb.resolve("/dir/sub/deeper/leaf.bin").ino
        pattern = [{"ino": small, "first_access_time_secs": 5, "first_access_time_nanos": 0},
                   {"ino": leaf, "first_access_time_secs": 4, "first_access_time_nanos": 0},
                   {"ino": 123456}]
        assert paths_in_access_order(sb, pattern) == ["/dir/sub/deeper/leaf.bin", "/dir/sub/f001"]
