"""Leaf modules: the error tree, codecs, digesters and logging setup."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys

import pytest

from nydusd import compress, errors
from nydusd.compress import Compressor
from nydusd.digest import DigestAlgorithm


@pytest.mark.parametrize(("cls", "eno", "status"), [
    (errors.NydusError, errno.EIO, 500),
    (errors.NotFound, errno.ENOENT, 404),
    (errors.AlreadyExists, errno.EEXIST, 409),
    (errors.ConfigError, errno.EINVAL, 400),
    (errors.CorruptMetadata, errno.EIO, 500),
    (errors.IntegrityError, errno.EIO, 500),
    (errors.BlobNotFound, errno.EIO, 500),  # the file exists, its data doesn't
    (errors.ReadOnly, errno.EROFS, 405),
    (errors.Unsupported, errno.ENOTSUP, 501),
])
def test_error_classes_carry_errno_and_status(cls: type[errors.NydusError], eno: int, status: int) -> None:
    assert cls.errno == eno
    assert cls.http_status == status
    assert issubclass(cls, errors.NydusError)


def test_error_message_renders_context() -> None:
    e = errors.BackendError("read failed", transient=True, blob_id="ab", offset=4096)
    assert str(e) == "read failed (blob_id=ab, offset=4096)"
    assert e.transient and e.blob_id == "ab" and e.offset == 4096
    assert str(errors.NotFound("no such mountpoint")) == "no such mountpoint"


@pytest.mark.parametrize("algo", list(Compressor))
@pytest.mark.parametrize("data", [b"", b"x", os.urandom(4096), b"abc" * 100_000])
def test_codec_round_trip_and_store_raw_rule(algo: Compressor, data: bytes) -> None:
    payload, compressed = compress.compress(data, algo)
    if compressed:
        assert len(payload) < len(data)
        assert compress.decompress(payload, algo, len(data)) == data
    else:  # incompressible, empty or NONE: stored raw
        assert payload == data


def test_lz4_block_is_a_raw_block_without_size_prefix() -> None:
    payload, compressed = compress.compress(b"a" * 1000, Compressor.LZ4_BLOCK)
    assert compressed
    # a size-prefixed block would start with the little-endian length 1000 = e8 03 00 00
    assert payload[:4] != (1000).to_bytes(4, "little")


@pytest.mark.parametrize("algo", [Compressor.LZ4_BLOCK, Compressor.ZSTD, Compressor.GZIP])
def test_decompress_rejects_garbage_and_wrong_size(algo: Compressor) -> None:
    payload, _ = compress.compress(b"hello world " * 100, algo)
    with pytest.raises(errors.IntegrityError):
        compress.decompress(b"\x00garbage" * 10, algo, 1200)
    with pytest.raises(errors.IntegrityError):
        compress.decompress(payload, algo, 1199 if algo is not Compressor.ZSTD else 1300)


def test_compressor_encodings_match_the_spec() -> None:
    assert [c.algo for c in (Compressor.NONE, Compressor.LZ4_BLOCK, Compressor.GZIP, Compressor.ZSTD)] \
        == [0, 1, 2, 3]
    assert Compressor.from_sb_flags(0x80 | 0x04) is Compressor.ZSTD
    assert Compressor.from_sb_flags(0x01 | 0x80) is Compressor.NONE  # first of NONE, LZ4, GZIP, ZSTD
    assert Compressor.from_sb_flags(0) is Compressor.LZ4_BLOCK
    with pytest.raises(errors.InvalidArgument, match="unknown compressor 'lzma'"):
        Compressor.parse("lzma")


def test_digesters() -> None:
    import hashlib
    assert DigestAlgorithm.SHA256.hash(b"abc") == hashlib.sha256(b"abc").digest()
    # BLAKE3 test vector for the empty input
    assert DigestAlgorithm.BLAKE3.hash(b"").hex().startswith("af1349b9f5f9a1a6")
    assert DigestAlgorithm.from_sb_flags(0x08) is DigestAlgorithm.SHA256
    assert DigestAlgorithm.from_sb_flags(0x0C) is DigestAlgorithm.BLAKE3
    assert DigestAlgorithm.from_sb_flags(0) is DigestAlgorithm.BLAKE3


def _run_logging(code: str, tty: bool = False) -> str:
    script = ("from nydusd.log import configure_logging, get_logger\n" + code)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return res.stderr


def test_logging_is_json_when_not_a_tty() -> None:
    out = _run_logging("configure_logging('info')\nget_logger('t').info('thing_done', n=3)\n"
                       "get_logger('t').debug('hidden')")
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == 1
    assert lines[0]["event"] == "thing_done" and lines[0]["n"] == 3 and lines[0]["level"] == "info"


def test_log_file_and_level(tmp_path) -> None:  # type: ignore[no-untyped-def]
    f = tmp_path / "d.log"
    _run_logging(f"configure_logging('debug', log_file={str(f)!r})\nget_logger('t').debug('dbg_seen')")
    assert json.loads(f.read_text())["event"] == "dbg_seen"


def test_log_file_parent_directories_are_created(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """nydus-snapshotter passes ``--log-file <log dir>/<daemon id>/nydusd.log`` and never creates
    ``<daemon id>/``; upstream nydusd creates it (regression: ours exited with "cannot open log
    file: No such file or directory")."""
    f = tmp_path / "logs" / "d1" / "nydusd.log"
    _run_logging(f"configure_logging('info', log_file={str(f)!r})\nget_logger('t').info('started')")
    assert json.loads(f.read_text())["event"] == "started"


STDLIB_RECORDS = (
    "import logging\n"
    "logging.getLogger('uvicorn.error').info('Started server process [%d]', 42)\n"
    "logging.getLogger('llfuse').info('handler raised %s exception (%s), terminating main loop.',"
    " \"<class 'nydusd.fs.fuse.SessionStop'>\", '')\n"
    "logging.getLogger('llfuse').warning('other llfuse news')\n")


def test_stdlib_records_share_the_pipeline_and_shutdown_noise_is_dropped() -> None:
    out = _run_logging("configure_logging('info')\n" + STDLIB_RECORDS)
    lines = [json.loads(line) for line in out.splitlines()]
    assert [(e["logger"], e["event"], e["level"]) for e in lines] == [
        ("uvicorn.error", "Started server process [42]", "info"), ("llfuse", "other llfuse news", "warning")]
    assert all(e["timestamp"].endswith("Z") for e in lines)


@pytest.mark.parametrize("how", ["configure_logging('info', fmt='text')\n",
                                 "import os; os.environ['NYDUS_LOG_FORMAT'] = 'text'\n"
                                 "configure_logging('info')\n"])
def test_upstream_plain_text_form(how: str) -> None:
    out = _run_logging(how + "log = get_logger('t')\nlog.info('thing_done', n=3, path='/a b')\n"
                       "log.warning('careful', x=1)\n" + STDLIB_RECORDS)
    stamp = r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6} [+-]\d\d:\d\d\]"
    lines = out.splitlines()
    assert len(lines) == 4, out
    assert re.fullmatch(stamp + r" INFO thing_done n=3 path='/a b'", lines[0])
    assert re.fullmatch(stamp + r" WARN \[<string>:\d+\] careful x=1", lines[1])
    assert re.fullmatch(stamp + r" INFO Started server process \[42\]", lines[2])
    assert re.fullmatch(stamp + r" WARN \[<string>:\d+\] other llfuse news", lines[3])


def test_redirect_output_hands_whole_lines_to_the_sink() -> None:
    out = _run_logging("from nydusd.log import redirect_output\nimport sys\n"
                       "configure_logging('info', fmt='json')\n"
                       "with redirect_output(lambda line: sys.stderr.write('ABOVE ' + line + '\\n')):\n"
                       "    get_logger('t').info('inside', n=1)\n"
                       "get_logger('t').info('outside')\n")
    first, second = out.splitlines()
    assert first.startswith("ABOVE {") and json.loads(first[6:])["event"] == "inside"
    assert json.loads(second)["event"] == "outside"


def test_bad_log_level_and_file_are_config_errors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from nydusd.log import configure_logging
    with pytest.raises(errors.ConfigError, match="invalid log level 'loud'"):
        configure_logging("loud")
    (tmp_path / "file").write_text("x")  # a parent that is a regular file cannot become a directory
    with pytest.raises(errors.ConfigError, match="cannot open log file: Not a directory"):
        configure_logging("info", log_file=str(tmp_path / "file" / "d" / "x.log"))
    with pytest.raises(errors.ConfigError, match="cannot open log file: Is a directory"):
        configure_logging("info", log_file=str(tmp_path))
    assert (tmp_path / "file").read_text() == "x"
    with pytest.raises(errors.ConfigError,
                       match="invalid log format 'xml', expected one of json, console, text"):
        configure_logging("info", fmt="xml")


@pytest.mark.parametrize("fmt", ["json", "text", "console"])
def test_stdlib_records_are_redacted_too(fmt: str) -> None:
    """uvicorn/urllib3 records go through the same pipeline, so a proxy password in one (a
    message or a traceback) is masked like in our own events."""
    out = _run_logging(
        f"configure_logging('info', fmt={fmt!r})\n"
        "import logging\n"
        "logging.getLogger('urllib3').warning('proxy %s failed', 'http://u:s3cret@127.0.0.1:3128')\n"
        "try:\n"
        "    raise OSError('via http://u:s3cret@127.0.0.1:3128')\n"
        "except OSError:\n"
        "    logging.getLogger('uvicorn.error').exception('boom')\n")
    assert "s3cret" not in out
    assert out.count("u:***@127.0.0.1:3128") == 2, out
