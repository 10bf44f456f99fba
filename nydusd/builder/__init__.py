"""The image builder (== nydus-builder): directory or tar -> RAFS bootstrap + data blob; merge.

Public API::

    build(source, BuildOptions) -> BuildOutput       # nydusd.builder.build
    merge(layers, MergeOptions) -> BuildOutput        # nydusd.builder.merge

``source`` is a directory path (``SourceType.DIRECTORY``) or, for ``SourceType.TARBALL``, a tar path,
``"-"`` (stdin), a FIFO, or any binary file object with ``read`` (e.g. a registry layer stream; plain,
gzip or zstd tars are detected by magic). Must not import fs, daemon, api or converter.
"""

from __future__ import annotations

from nydusd.builder.build import BuildOutput, build
from nydusd.builder.options import BuildOptions, SourceType, WhiteoutSpec

__all__ = ["BuildOptions", "BuildOutput", "SourceType", "WhiteoutSpec", "build"]
