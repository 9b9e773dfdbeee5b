"""Write a file atomically: into a temporary sibling, renamed over the destination once complete.

A reader (or a resumed run) never sees a half-written file under the final name: an interrupted
write leaves at most a hidden `.<name>.*.tmp` sibling, removed when the writer fails in Python.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator

__all__ = ["atomic_output"]


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
