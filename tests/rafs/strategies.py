"""Hypothesis strategies for random file trees (``Spec``), shared by the round-trip and kernel tests.

``roots(kernel=False)``: any tree the RAFS formats can hold (names of raw bytes up to 255, uid/gid up
to 2^32-1, symlinks up to 4096 bytes, xattrs on every type, char/block devices, fifos, hard links).
``roots(kernel=True)``: the subset the Linux VFS reports back unchanged (uid/gid below 2^31, symlink
targets below 4096 bytes, ``user.`` xattrs only on files and directories).
"""

from __future__ import annotations

import os

from hypothesis import strategies as st

from tests.rafs.imagegen import Spec

NAME_CHARS = st.characters(blacklist_characters="/\0", blacklist_categories=("Cs",))
names = st.one_of(
    st.text(NAME_CHARS, min_size=1, max_size=12).map(str.encode),
    st.binary(min_size=1, max_size=12).filter(lambda b: b"/" not in b and b"\0" not in b),
    st.integers(200, 255).map(lambda n: b"L" * n),
).filter(lambda b: len(b) <= 255 and b not in (b".", b".."))
CHUNK = 4096
contents = st.one_of(st.just(b""), st.binary(max_size=300),
                     st.integers(1, 3 * CHUNK + 7).map(lambda n: os.urandom(n)),
                     st.integers(1, 3).map(lambda n: b"dedup" * (CHUNK // 5 * n)))


def _xattrs(prefixes: list[bytes]) -> st.SearchStrategy[dict[bytes, bytes]]:
    xattr_names = st.tuples(st.sampled_from(prefixes),
                            st.binary(min_size=1, max_size=20).filter(lambda b: b"\0" not in b)
                            ).map(lambda t: t[0] + t[1])
    return st.dictionaries(xattr_names, st.binary(max_size=64), max_size=3)


def _attrs(kernel: bool, kind: str) -> st.SearchStrategy[dict[str, object]]:
    max_id = 2**31 - 1 if kernel else 2**32 - 1
    prefixes = [b"user.", b"trusted.", b"security."]
    if kernel and kind not in ("file", "dir"):
        prefixes = [b"trusted.", b"security."]  # the VFS hides user.* on other types
    return st.fixed_dictionaries({
        "perm": st.integers(0, 0o7777), "uid": st.integers(0, max_id), "gid": st.integers(0, max_id),
        "mtime": st.integers(0, 2**40), "nsec": st.integers(0, 999_999_999),
        "xattrs": _xattrs(prefixes)})


def _leaf(kernel: bool) -> st.SearchStrategy[Spec]:
    max_target = 4095 if kernel else 4096  # the kernel's readlink stops at PATH_MAX - 1
    targets = st.one_of(st.binary(min_size=1, max_size=60),
                        st.integers(1, max_target).map(lambda n: b"t" * n)).filter(lambda b: b"\0" not in b)
    return st.one_of(
        st.builds(lambda a, d: Spec("file", data=d, **a), _attrs(kernel, "file"), contents),
        st.builds(lambda a, t: Spec("symlink", target=t, **a), _attrs(kernel, "symlink"), targets),
        st.builds(lambda a, k, ma, mi: Spec(k, rdev=os.makedev(ma, mi), **a), _attrs(kernel, "dev"),
                  st.sampled_from(["chr", "blk"]), st.integers(0, 4095), st.integers(0, 2**20 - 1)),
        st.builds(lambda a: Spec("fifo", **a), _attrs(kernel, "fifo")),
    )


def _trees(kernel: bool) -> st.SearchStrategy[Spec]:
    return st.recursive(_leaf(kernel), lambda kids: st.builds(
        lambda a, ch: Spec("dir", children=ch, **a), _attrs(kernel, "dir"),
        st.dictionaries(names, kids, max_size=6)), max_leaves=25)


@st.composite
def roots(draw: st.DrawFn, kernel: bool = False) -> Spec:
    root = draw(st.builds(lambda a, ch: Spec("dir", children=ch, **a), _attrs(kernel, "dir"),
                          st.dictionaries(names, _trees(kernel), max_size=6)))
    files: list[bytes] = []
    dirs: list[tuple[bytes, Spec]] = []

    def visit(spec: Spec, path: bytes) -> None:
        for name, child in spec.children.items():
            cpath = path.rstrip(b"/") + b"/" + name
            if child.kind == "file":
                files.append(cpath)
            elif child.kind == "dir":
                dirs.append((cpath, child))
                visit(child, cpath)

    dirs.append((b"/", root))
    visit(root, b"/")
    for _ in range(draw(st.integers(0, 3)) if files else 0):  # hard links to random files
        target = draw(st.sampled_from(files))
        _dpath, d = draw(st.sampled_from(dirs))
        name = draw(names)
        if name not in d.children:
            d.children[name] = Spec("link", target=target)
    return root
