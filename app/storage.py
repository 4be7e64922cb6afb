"""One storage layer for local paths and `s3://bucket/key`: read, atomic write, list, cache.

S3 settings come from the standard AWS variables (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`), so a local S3-compatible server works unchanged.
Writes are atomic: a local file is written under a temporary name and renamed; an S3 object only
becomes visible when its (multipart) upload completes. A crash never leaves a half file that looks
whole.
"""
from __future__ import annotations

import fnmatch
import functools
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

_S3 = "s3://"


def is_s3(path: str) -> bool:
    return str(path).startswith(_S3)


def join(base: str, *parts: str) -> str:
    """Join path parts with `/` for S3 and os.path rules locally."""
    if is_s3(base):
        return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(base, *parts)


def absolute(path: str) -> str:
    """An absolute form of `path` (Ray workers run in another working directory)."""
    return str(path) if is_s3(path) else os.path.abspath(os.path.expanduser(str(path)))


@functools.lru_cache(maxsize=4)
def _s3_fs(endpoint: str | None, region: str | None) -> pafs.S3FileSystem:
    kwargs: dict[str, Any] = {"region": region or "us-east-1"}
    if endpoint:
        u = urlparse(endpoint)
        kwargs["endpoint_override"] = u.netloc or u.path
        kwargs["scheme"] = u.scheme or "https"
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        kwargs.update(access_key=key, secret_key=secret, session_token=os.environ.get("AWS_SESSION_TOKEN"))
    return pafs.S3FileSystem(**kwargs)


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a local path or an s3:// URI."""
    if is_s3(path):
        fs = _s3_fs(os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
                    os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION"))
        return fs, str(path)[len(_S3):]
    return pafs.LocalFileSystem(), absolute(path)


def exists(path: str) -> bool:
    fs, p = filesystem(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def size(path: str) -> int:
    fs, p = filesystem(path)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(path)
    return info.size


def makedirs(path: str) -> None:
    """Create a local directory tree (S3 has no directories: a no-op there)."""
    if not is_s3(path):
        os.makedirs(absolute(path), exist_ok=True)


def read_bytes(path: str) -> bytes:
    fs, p = filesystem(path)
    try:
        with fs.open_input_stream(p) as f:
            return f.read()
    except FileNotFoundError:
        raise
    except OSError as e:
        if "not found" in str(e).lower() or "no such" in str(e).lower():
            raise FileNotFoundError(path) from e
        raise


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def read_json(path: str) -> Any:
    return json.loads(read_text(path))


def write_bytes(path: str, data: bytes) -> None:
    """Write `data` to `path` atomically (readers see the old file, or no file, or the whole new one)."""
    if is_s3(path):
        fs, p = filesystem(path)
        with fs.open_output_stream(p) as f:  # the object appears only when the upload completes
            f.write(data)
        return
    path = absolute(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def upload_file(local: str, path: str) -> None:
    """Copy a local file to `path` (local or S3) atomically, streaming (no whole-file buffer)."""
    fs, p = filesystem(path)
    if not is_s3(path):
        os.makedirs(os.path.dirname(p), exist_ok=True)
        tmp = f"{p}.tmp-{uuid.uuid4().hex}"
        try:
            shutil.copyfile(local, tmp)
            os.replace(tmp, p)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return
    with open(local, "rb") as src, fs.open_output_stream(p) as dst:
        shutil.copyfileobj(src, dst, length=16 << 20)


def download_file(path: str, local: str) -> None:
    """Copy `path` (local or S3) to a local file atomically."""
    fs, p = filesystem(path)
    os.makedirs(os.path.dirname(os.path.abspath(local)) or ".", exist_ok=True)
    tmp = f"{local}.tmp-{uuid.uuid4().hex}"
    try:
        with fs.open_input_stream(p) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, length=16 << 20)
        os.replace(tmp, local)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def list_files(path: str, recursive: bool = True) -> list[str]:
    """Sorted full paths (same scheme as `path`) of the files under a directory/prefix."""
    fs, p = filesystem(path)
    if fs.get_file_info(p).type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=recursive, allow_not_found=True))
    prefix = _S3 if is_s3(path) else ""
    return sorted(prefix + i.path for i in infos if i.type == pafs.FileType.File)


def glob(pattern: str) -> list[str]:
    """Sorted paths matching a glob (`*`, `?`, `[..]`, `**`), local or S3; a plain path matches itself."""
    if not any(c in pattern for c in "*?["):
        return [pattern] if exists(pattern) else []
    parts = pattern.split("/")
    fixed = next(i for i, part in enumerate(parts) if any(c in part for c in "*?["))
    base = "/".join(parts[:fixed]) or "/"
    if not is_s3(pattern):
        base = absolute(base)
        pattern = absolute(pattern)
    recursive = "**" in pattern or len(parts) - fixed > 1
    regex = fnmatch.translate(pattern.replace("**/", "*").replace("**", "*"))
    import re

    rx = re.compile(regex)
    return [f for f in list_files(base, recursive=recursive) if rx.match(f)]


def remove(path: str, recursive: bool = False) -> None:
    """Delete a file (or, with recursive, a directory/prefix). Missing paths are fine."""
    fs, p = filesystem(path)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.Directory and recursive:
        fs.delete_dir(p)
    elif info.type == pafs.FileType.File:
        fs.delete_file(p)
    elif recursive and is_s3(path):
        try:
            fs.delete_dir_contents(p, missing_dir_ok=True)
        except OSError:
            pass


def upload_dir(local_dir: str, path: str) -> None:
    """Copy every file under `local_dir` to the same relative paths under `path`."""
    for root, _, files in os.walk(local_dir):
        for name in sorted(files):
            src = os.path.join(root, name)
            upload_file(src, join(path, os.path.relpath(src, local_dir).replace(os.sep, "/")))


def download_dir(path: str, local_dir: str) -> str:
    """Copy every file under `path` into `local_dir` (same relative layout); returns local_dir."""
    root = str(path).rstrip("/")
    if not is_s3(root):
        root = absolute(root)
    for f in list_files(path):
        download_file(f, os.path.join(local_dir, f[len(root):].lstrip("/")))
    return local_dir


def cache_dir() -> str:
    """Local directory for files cached from S3 (`SPOTLM_CACHE`, default ~/.cache/spotlm)."""
    d = os.environ.get("SPOTLM_CACHE") or os.path.join(Path.home(), ".cache", "spotlm")
    os.makedirs(d, exist_ok=True)
    return d


def local_path(path: str, expected_size: int | None = None) -> str:
    """A local file with the contents of `path`: the path itself if local, else a cached download.

    The cache key is the URI; a cached copy whose size differs from `expected_size` (or from the
    object's size when not given) is downloaded again.
    """
    if not is_s3(path):
        return absolute(path)
    key = hashlib.sha256(str(path).encode()).hexdigest()[:24]
    local = os.path.join(cache_dir(), key + "-" + os.path.basename(str(path)))
    want = expected_size if expected_size is not None else size(path)
    if not (os.path.exists(local) and os.path.getsize(local) == want):
        download_file(path, local)
    return local


def local_dir(path: str) -> str:
    """A local directory with the contents of `path`: itself if local, else a cached download."""
    if not is_s3(path):
        return absolute(path)
    key = hashlib.sha256(str(path).encode()).hexdigest()[:24]
    return download_dir(path, os.path.join(cache_dir(), key))
