"""Write a file or replace a folder atomically, and clean up after writers that were killed.

`atomic_output` writes a file into a temporary sibling, renamed over the destination once complete: a
reader (or a resumed run) never sees a half-written file under the final name; an interrupted write
leaves at most a hidden `.<name>.*.tmp` sibling, removed when the writer fails in Python.

`replace_folder`, `recover_folder` and `remove_stale_siblings` do the same for folders (composites):
see the section below.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator

__all__ = ["atomic_output", "replace_folder", "replace_entries", "recover_folder", "remove_stale_siblings", "owner_tag",
           "sibling_prefix"]


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside `path`; on success rename it to `path`, on error delete it.

    Example:
        >>> with atomic_output("out.jsonl") as tmp:
        ...     with open(tmp, "w") as handle:
        ...         handle.write("...")
    """
    path = os.path.abspath(os.fspath(path))
    folder, name = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    os.close(handle)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


# ------------------------------------------------------------------------------------------------ folders
# A folder is replaced by two renames: the old one goes aside, the complete new one takes its place. A
# process killed between the two leaves no folder at the path but the old one aside; `recover_folder`
# puts it back (the next save and the next load call it). Every hidden sibling hf_eu makes carries its
# owner in its name, `.<name>.<kind>-<pid>@<host>-<random>`, so that leftovers of dead processes can be
# told from the work of live ones and removed (`remove_stale_siblings`).

_SIBLING = re.compile(r"\.(?P<kind>saving|replaced)-(?P<pid>\d+)@(?P<host>[0-9a-f]{8})-")


def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


def owner_tag(pid: int | None = None) -> str:
    """`<pid>@<host>` of this process (or of `pid` on this host): who owns a hidden sibling folder."""
    return f"{os.getpid() if pid is None else pid}@{_host_tag()}"


def sibling_prefix(folder: str | os.PathLike, kind: str) -> str:
    """The name prefix (without the random tail) of this process's `kind` sibling of `folder`."""
    return f".{os.path.basename(os.path.abspath(os.fspath(folder)))}.{kind}-{owner_tag()}-"


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name == "nt":  # os.kill(pid, 0) would terminate it there: never judge, never delete
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, owned by someone else (or unknowable): alive
    return True


def _siblings(folder: str) -> list[tuple[str, str, int, bool]]:
    """(path, kind, pid, owner is this process or dead) of the hidden siblings hf_eu made for `folder`.

    Siblings made on another host (a shared file system) are left out: their owners cannot be checked.
    """
    parent, name = os.path.split(folder)
    prefix = f".{name}."
    found = []
    try:
        entries = os.listdir(parent)
    except OSError:
        return found
    host = _host_tag()
    for entry in entries:
        if not entry.startswith(prefix):
            continue
        match = _SIBLING.match(entry, len(prefix) - 1)
        if match is None or match.group("host") != host:
            continue
        pid = int(match.group("pid"))
        found.append((os.path.join(parent, entry), match.group("kind"), pid,
                      pid == os.getpid() or not _process_alive(pid)))
    return found


def replace_folder(staging: str | os.PathLike, folder: str | os.PathLike) -> None:
    """Move the complete folder `staging` to `folder`; an old `folder` is set aside first, deleted last.

    The old folder is kept as `.<name>.replaced-<owner>-*` until the new one is in place, so at every
    moment either `folder` or that sibling holds a complete folder; `recover_folder` restores the sibling
    after a process was killed between the two renames.
    """
    staging, folder = os.path.abspath(os.fspath(staging)), os.path.abspath(os.fspath(folder))
    if not os.path.lexists(folder):
        os.rename(staging, folder)
        return
    aside = tempfile.mkdtemp(prefix=sibling_prefix(folder, "replaced"), dir=os.path.dirname(folder))
    os.rmdir(aside)  # only the unique name is wanted: rename needs a free destination on every platform
    os.rename(folder, aside)
    try:
        os.rename(staging, folder)
    except BaseException:
        with contextlib.suppress(OSError):
            os.rename(aside, folder)  # put the old folder back at once
        raise
    shutil.rmtree(aside, ignore_errors=True)


def replace_entries(staging: str | os.PathLike, folder: str | os.PathLike, *, last: str | None = None,
                    remove: list[str] | tuple[str, ...] = ()) -> None:
    """Move every entry of the complete folder `staging` into the existing `folder`, leaving its other entries.

    Each entry replaces its namesake atomically (`os.replace` for a file; a folder goes through
    `replace_folder`), the entry named `last` after all others; then the entries named in `remove` are
    deleted, and `staging` (empty by then) too. For a folder that also holds files its writer does not own.
    """
    staging, folder = os.path.abspath(os.fspath(staging)), os.path.abspath(os.fspath(folder))
    names = sorted(os.listdir(staging), key=lambda name: (name == last, name))
    for name in names:
        source, destination = os.path.join(staging, name), os.path.join(folder, name)
        if os.path.isdir(source) and not os.path.islink(source):
            if os.path.lexists(destination) and not os.path.isdir(destination):
                os.unlink(destination)
            replace_folder(source, destination)
        else:
            if os.path.isdir(destination) and not os.path.islink(destination):
                shutil.rmtree(destination)
            os.replace(source, destination)
    for name in remove:
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            os.unlink(path)
    os.rmdir(staging)


def recover_folder(folder: str | os.PathLike) -> bool:
    """Restore `folder` from the aside copy of a replace that was killed halfway; True if it did.

    Only when nothing is at `folder` and an aside copy left by this process or a dead one exists (the
    newest, if several). The copy was the complete folder before the interrupted replace began.
    """
    folder = os.path.abspath(os.fspath(folder))
    if os.path.lexists(folder):
        return False
    asides = [path for path, kind, _, abandoned in _siblings(folder) if kind == "replaced" and abandoned]
    for path in sorted(asides, key=_mtime, reverse=True):
        try:
            os.rename(path, folder)
            return True
        except OSError:
            if os.path.lexists(folder):  # another process recovered it first
                return False
    return False


def remove_stale_siblings(folder: str | os.PathLike) -> list[str]:
    """Delete the staging and aside folders that dead processes left beside `folder`; return their paths.

    Call `recover_folder` first: an aside copy is the only copy while nothing is at `folder`.
    """
    folder = os.path.abspath(os.fspath(folder))
    if not os.path.lexists(folder):
        return []
    removed = []
    for path, _, pid, _ in _siblings(folder):
        if pid != os.getpid() and not _process_alive(pid):
            if os.path.islink(path) or not os.path.isdir(path):
                with contextlib.suppress(OSError):
                    os.unlink(path)
            else:
                shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _mtime(path: str) -> float:
    try:
        return os.lstat(path).st_mtime
    except OSError:
        return 0.0
