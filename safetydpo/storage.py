"""The run root: one folder (or storage URI) under which every stage writes.

Writes are atomic (temp name, then rename) so a reader never sees half a file and a
re-run can trust whatever exists. Remote roots (``s3://``, ``gs://``...) go through
``pyarrow.fs``; there a single-object put is already atomic.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def join(root: str, *parts: str) -> str:
    """Join path parts under a local folder or a URI."""
    if is_remote(root):
        return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(root.removeprefix("file://"), *parts))


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The ``pyarrow.fs`` filesystem of a local path or URI, and the path in it (local paths made absolute)."""
    if is_remote(uri):
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), str(Path(uri.removeprefix("file://")).resolve())


def exists(uri: str) -> bool:
    if not is_remote(uri):
        return Path(uri).exists()
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_dirs(uri: str) -> list[str]:
    """Names of the folders directly under ``uri``, sorted; [] when it does not exist."""
    fs, path = filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(Path(i.path).name for i in infos if i.type == pafs.FileType.Directory)


def remove_tree(uri: str) -> None:
    """Delete the folder ``uri`` and everything under it, if it exists."""
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


def move(src: str, dst: str) -> bool:
    """Move the file or folder ``src`` to ``dst`` (whose parent is created); False when ``src`` does not exist.
    Local: one rename. Object stores: ``pyarrow.fs`` copies, then deletes."""
    fs, source = filesystem(src)
    if fs.get_file_info(source).type == pafs.FileType.NotFound:
        return False
    _, target = filesystem(dst)
    fs.create_dir(target.rsplit("/", 1)[0])
    fs.move(source, target)
    return True


def write_tree(local_dir: str, uri: str, last: str | None = None) -> None:
    """Put a copy of the local folder ``local_dir`` at ``uri``, replacing what is there. Local: copied beside the
    target, then renamed into place whole. Remote: file by file, the file named ``last`` (a path relative to
    ``local_dir``) after all others, so its presence says the copy is whole."""
    source = Path(local_dir)
    if not is_remote(uri):
        target = Path(uri.removeprefix("file://"))
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.parent / f".{target.name}.{os.getpid()}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(source, staging)
        remove_tree(str(target))
        os.replace(staging, target)
        return
    remove_tree(uri)
    files = [p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file()]
    for relative in sorted(files, key=lambda r: (r == last, r)):
        write_bytes(join(uri, relative), (source / relative).read_bytes())


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _current_umask()  # read once at import: os.umask can only be read by setting it, which races threads


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri`` atomically, with the permissions a plain ``open`` would give it."""
    if is_remote(uri):
        fs, path = filesystem(uri)
        with fs.open_output_stream(path) as out:
            out.write(data)
        return
    target = Path(uri)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp's 0600 would hide run outputs from the cluster's other users
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_bytes(uri: str) -> bytes:
    if not is_remote(uri):
        return Path(uri).read_bytes()
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as stream:
        return stream.read()


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode())


def fingerprint(*parts: Any, length: int = 12) -> str:
    """Stable short hash of JSON-serialisable parts: keys a stage's output to its inputs."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]
