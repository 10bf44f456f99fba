"""The image builder (== nydus-builder): directory or tar -> RAFS bootstrap + data blob; merge.

Public API::

    build(source, BuildOptions, *, blob_file=None) -> BuildOutput   # nydusd.builder.build
    merge(layer_bootstrap_paths, MergeOptions) -> BuildOutput       # nydusd.builder.merge

``BuildOutput``: ``bootstrap_path``, ``blob_path``, ``blob_id`` (the new data blob, None when the
layer added no data), ``blobs`` (the blob table ids), ``bootstrap`` (the bootstrap bytes),
``stats``, ``to_json()`` (the ``--output-json`` document). Errors: BuildError (bad input, exit 1),
InvalidArgument (inconsistent options / layers, exit 2); nothing is left under a final name.

``source`` is a directory path (``SourceType.DIRECTORY``) or, for ``SourceType.TARBALL``, a tar path,
``"-"`` (stdin), a FIFO, or any binary file object with ``read`` (e.g. a registry layer stream; plain,
gzip or zstd tars are detected by magic). Must not import fs, daemon, api or converter.
"""

from __future__ import annotations

from nydusd.builder.build import BuildOutput, build
from nydusd.builder.merge import MergeOptions, merge
from nydusd.builder.options import BuildOptions, SourceType, WhiteoutSpec

__all__ = ["BuildOptions", "BuildOutput", "MergeOptions", "SourceType", "WhiteoutSpec", "build", "merge"]
