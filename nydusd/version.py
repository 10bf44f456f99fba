"""The build lines every tool prints for ``--version`` and ``GET /api/v1/daemon`` reports.

Owns: ``version_info`` (DaemonInfo.version: ``package_ver``, ``git_commit``, ``build_time``,
``profile``, ``rustc``), ``version_text`` (upstream's ``--version`` lines, which nydus-snapshotter
and acceleration-service parse: ``Version:`` and ``Git Commit:`` start their own lines) and
``_git_commit`` (the commit of the checkout this package runs from).

A leaf: imports nothing of nydusd but ``__version__``, so ``--version`` loads no daemon code.
Thread-safety: ``version_info`` computes once; a race computes the same dict twice.
"""

from __future__ import annotations

from pathlib import Path

from nydusd import __version__


def _git_commit() -> str:
    """The commit of the checkout this package runs from ("unknown" outside a git checkout)."""
    git = Path(__file__).resolve().parent.parent / ".git"
    try:
        if git.is_file():  # a linked worktree: ".git" names the real git directory
            gitdir = git.read_text().strip().removeprefix("gitdir: ")
            git = Path(gitdir) if Path(gitdir).is_absolute() else git.parent / gitdir
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head[5:]
        common = git / "commondir"  # a worktree keeps its refs in the main git directory
        roots = [git, (git / common.read_text().strip()).resolve()] if common.is_file() else [git]
        for root in roots:
            if (root / ref).is_file():
                return (root / ref).read_text().strip()
        for root in roots:
            packed = root / "packed-refs"
            if packed.is_file():
                for line in packed.read_text().splitlines():
                    if line.endswith(" " + ref):
                        return line.split()[0]
    except OSError:
        pass
    return "unknown"


_VERSION: dict[str, str] | None = None


def version_info() -> dict[str, str]:
    """Build info as in DaemonInfo.version; ``git_commit`` equals the ``--version`` Git Commit line."""
    global _VERSION
    if _VERSION is None:
        _VERSION = {"package_ver": f"v{__version__}", "git_commit": _git_commit(),
                    "build_time": "", "profile": "release", "rustc": "python"}
    return dict(_VERSION)


def version_text(prog: str = "nydusd") -> str:
    """The ``--version`` text; ``Version:`` and ``Git Commit:`` start their own lines (spec §1.7)."""
    v = version_info()
    return (f"{prog}\nVersion: \t{v['package_ver']}\nGit Commit: \t{v['git_commit']}\n"
            f"Build Time: \t{v['build_time']}\nProfile: \t{v['profile']}\nRustc: \t\t{v['rustc']}\n")
