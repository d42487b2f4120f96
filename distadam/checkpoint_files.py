"""The on-disk format of sharded checkpoints, read as hostile input.

Everything :mod:`distadam.checkpoint` reads from storage goes through this
module, and nothing here trusts what it reads:

* names: a checkpoint directory is exactly ``ckpt-<step>`` with the step
  zero-padded to 12 digits (``ckpt-000000000008.bak`` or ``ckpt-latest`` are
  someone else's and are ignored); files inside it are exactly the names the
  manifest format allows (never a path);
* files: opened without following symlinks and without blocking (a FIFO or
  ``/dev/zero`` planted under a valid name is refused by ``fstat``, never
  read), only regular files, and only after their size has been checked
  against what this model's checkpoint can hold;
* the manifest: size-capped, strict JSON (no NaN), carries a SHA-256 over its
  own canonical form;
* ``.npz`` contents: parsed here rather than with ``np.load``: every member
  must be stored uncompressed (no zip bombs), named as expected, and its
  ``.npy`` header must give exactly the expected dtype and shape before a
  single element is looked at. Arrays are views into the file's bytes that
  were hashed, so what is checked is what is used. Object arrays (pickles)
  are never accepted.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import math
import os
import re
import stat
import struct
import zipfile

import numpy as np

#: The manifest format this code writes and reads. 2 added the manifest
#: digest, sizes, the job identity and the ``model`` weight table. A future
#: placement of optimizer state (e.g. replicated state for sparse variables)
#: becomes its own manifest section and files, with a version bump.
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
MODEL_FILE = "model.npz"
PREFIX = "ckpt-"
PARTIAL_PREFIX = ".partial-"
#: A committed checkpoint moved aside while a save of the same step replaces
#: it; it counts as that step's checkpoint until the replacement is committed.
SUPERSEDED_PREFIX = ".superseded-"
_STEP_DIGITS = 12
_NAME = re.compile(r"ckpt-(\d{12,})")
_SHARD = re.compile(r"shard-(\d{5,})-of-(\d{5,})\.npz")
_SHA256 = re.compile(r"[0-9a-f]{64}")

#: No manifest of a real model comes near this; a bigger one is not parsed.
MAX_MANIFEST_BYTES = 64 << 20
#: Most shards (workers of a sharding group) a checkpoint may have.
MAX_SHARDS = 1 << 20
#: Per-array and per-file allowance for zip and .npy headers when bounding a
#: file's size from the arrays it must hold (np.savez writes < 300 bytes per
#: member for the shapes used here).
_PER_ARRAY_OVERHEAD = 1024
_PER_FILE_OVERHEAD = 4096


class FormatError(ValueError):
    """A file does not have the content the format requires (message says what)."""


# ------------------------------------------------------------------- names
def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:0{_STEP_DIGITS}d}"


def step_of(name: str):
    """The step a directory name stands for, or None if the name is not ours
    (only the canonical zero-padded form counts)."""
    match = _NAME.fullmatch(name)
    if match is None:
        return None
    step = int(match.group(1))
    return step if checkpoint_name(step) == name else None


def superseded_name(step: int) -> str:
    return f"{SUPERSEDED_PREFIX}{checkpoint_name(step)}"


def committed_step_of(name: str):
    """The step of a committed checkpoint directory: its canonical name, or
    the name it has while a save of the same step replaces it."""
    if name.startswith(SUPERSEDED_PREFIX):
        name = name[len(SUPERSEDED_PREFIX):]
    return step_of(name)


def count_shard_files(directory, limit: int) -> int:
    """How many entries of ``directory`` are named like shard files, counting
    no further than ``limit`` (a directory crafted with millions of entries
    costs at most ``limit`` names)."""
    count = 0
    with os.scandir(directory) as entries:
        for entry in entries:
            if _SHARD.fullmatch(entry.name):
                count += 1
                if count >= limit:
                    break
    return count


def shard_file(shard: int, num_shards: int) -> str:
    return f"shard-{shard:05d}-of-{num_shards:05d}.npz"


def partial_name(step: int, job: str) -> str:
    return f"{PARTIAL_PREFIX}{checkpoint_name(step)}-{job}"


def list_checkpoints(directory) -> list:
    """(step, path) of every committed-looking checkpoint directory, oldest
    first. Entries whose name is not exactly ours, symlinks and non-directories
    are ignored. A step whose save was interrupted while replacing it is
    found under its superseded name (the previous copy, still whole)."""
    canonical, superseded = {}, {}
    with os.scandir(directory) as entries:
        for entry in entries:
            step = committed_step_of(entry.name)
            if step is None:
                continue
            try:
                if entry.is_symlink() or not entry.is_dir(follow_symlinks=False):
                    continue
            except OSError:
                continue
            found = superseded if entry.name.startswith(SUPERSEDED_PREFIX) else canonical
            found[step] = os.path.join(directory, entry.name)
    return sorted({**superseded, **canonical}.items())


def list_superseded(directory) -> list:
    """Names of ``.superseded-*`` entries in ``directory``."""
    with os.scandir(directory) as entries:
        return sorted(entry.name for entry in entries if entry.name.startswith(SUPERSEDED_PREFIX))


def list_partials(directory) -> list:
    """Names of leftover ``.partial-*`` entries in ``directory``."""
    with os.scandir(directory) as entries:
        return sorted(entry.name for entry in entries if entry.name.startswith(PARTIAL_PREFIX))


# ------------------------------------------------------------- reading files
def read_regular_file(directory, name: str, max_bytes: int, expected_size: int | None = None) -> bytes:
    """The whole content of ``directory/name``, a regular file that is not a
    symlink, of at most ``max_bytes`` (and exactly ``expected_size`` when
    given), checked with ``fstat`` before anything is read."""
    if "/" in name or name in ("", ".", ".."):
        raise FormatError(f"{name!r} is not a plain file name")
    path = os.path.join(directory, name)
    try:
        # O_NONBLOCK: opening a FIFO planted under this name must not wait for
        # a writer; O_NOFOLLOW: a symlink (to /dev/zero, ../x, ...) is refused.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise FormatError(f"missing file {name}") from None
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise FormatError(f"{name} is a symlink (only regular files are read)") from None
        raise FormatError(f"cannot open {name}: {error.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise FormatError(f"{name} is not a regular file")
        if expected_size is not None and info.st_size != expected_size:
            raise FormatError(
                f"{name} has {info.st_size} bytes, the manifest says {expected_size} (truncated or replaced)"
            )
        if info.st_size > max_bytes:
            raise FormatError(f"{name} has {info.st_size} bytes, more than the {max_bytes} this model's file can need")
        chunks, remaining = [], info.st_size
        while remaining > 0:
            chunk = os.read(fd, min(remaining, 1 << 24))
            if not chunk:
                raise FormatError(f"{name} shrank while being read")
            chunks.append(chunk)
            remaining -= len(chunk)
        if os.read(fd, 1):
            raise FormatError(f"{name} grew while being read")
        return b"".join(chunks)
    finally:
        os.close(fd)


def sha256_hex(data) -> str:
    return hashlib.sha256(data).hexdigest()


def hash_file(path) -> tuple:
    """(size, sha256) of a file this process has just written."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


# ------------------------------------------------------------------ manifest
def _canonical(manifest: dict) -> bytes:
    body = {k: v for k, v in manifest.items() if k != "digest"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def seal_manifest(manifest: dict) -> bytes:
    """The manifest's bytes, with ``digest``: SHA-256 of its canonical form
    (sorted keys, no whitespace, ASCII), so any edit that is not also a
    recomputation of the digest is detected. It guards against accidents and
    hand edits, not against someone who rewrites the digest too."""
    sealed = dict(manifest, digest=sha256_hex(_canonical(manifest)))
    return json.dumps(sealed, indent=1, sort_keys=True, allow_nan=False).encode()


def _reject_constant(name):
    raise FormatError(f"manifest holds {name}, which JSON does not allow")


def open_manifest(data: bytes) -> dict:
    """Parse and authenticate manifest bytes; returns the dict (digest
    checked, types not yet: see :func:`require`)."""
    try:
        manifest = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise FormatError(f"unreadable {MANIFEST} ({type(error).__name__}: {error})") from None
    if not isinstance(manifest, dict):
        raise FormatError(f"{MANIFEST} is not a JSON object")
    if manifest.get("format") != FORMAT_VERSION:
        raise FormatError(
            f"{MANIFEST} has format {manifest.get('format')!r}; this distadam reads format {FORMAT_VERSION}"
        )
    digest = manifest.get("digest")
    if not isinstance(digest, str) or digest != sha256_hex(_canonical(manifest)):
        raise FormatError(f"{MANIFEST} digest mismatch (the manifest was edited or corrupted)")
    return manifest


def require(value, kind, what: str, minimum=None, maximum=None):
    """``value`` if it has exactly type ``kind`` (bool is not an int here) and
    lies in [``minimum``, ``maximum``]; FormatError naming ``what`` otherwise."""
    if kind is int:
        ok = type(value) is int
    elif kind is float:
        ok = type(value) in (int, float) and math.isfinite(value)
    else:
        ok = type(value) is kind
    if not ok:
        raise FormatError(f"manifest field {what} is {value!r}, expected {kind.__name__}")
    if minimum is not None and value < minimum:
        raise FormatError(f"manifest field {what} is {value}, expected at least {minimum}")
    if maximum is not None and value > maximum:
        raise FormatError(f"manifest field {what} is {value}, expected at most {maximum}")
    return value


def require_keys(value, allowed, what: str) -> dict:
    """``value`` if it is an object with no keys beyond ``allowed`` (a field
    this version does not know is not silently ignored)."""
    if not isinstance(value, dict):
        raise FormatError(f"manifest field {what} is {value!r:.100}, expected an object")
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise FormatError(f"manifest field {what} has keys this format does not have: {unknown[:5]!r:.200}")
    return value


def require_file_entry(entry, name: str) -> tuple:
    if not isinstance(entry, dict) or set(entry) != {"size", "sha256"}:
        raise FormatError(f"manifest entry for {name} must be {{size, sha256}}, got {entry!r:.200}")
    size = require(entry["size"], int, f"files[{name}].size", minimum=0)
    sha = entry["sha256"]
    if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
        raise FormatError(f"manifest entry for {name} has no valid sha256")
    return size, sha


# ----------------------------------------------------------------------- npz
def storage_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype an ``.npy`` header records for ``dtype`` (e.g. ``V2`` for
    ml_dtypes' bfloat16, which numpy's format cannot name)."""
    return np.lib.format.descr_to_dtype(np.lib.format.dtype_to_descr(dtype))


def file_size_bound(arrays) -> int:
    """Largest size an ``.npz`` holding ``arrays`` ((dtype, shape) pairs) can
    have with the headers np.savez writes."""
    payload = sum(int(np.dtype(d).itemsize) * math.prod(shape) for d, shape in arrays)
    return payload + _PER_ARRAY_OVERHEAD * len(arrays) + _PER_FILE_OVERHEAD


def read_npz(data: bytes, name: str, expected: dict) -> dict:
    """The arrays of an ``.npz`` file's bytes, each checked to be exactly
    ``expected[key] = (dtype, shape)`` before its elements are touched; no
    other member is allowed. Returns read-only arrays viewing ``data``."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError) as error:
        raise FormatError(f"{name} is not a valid .npz ({error})") from None
    names = [m.filename for m in members]
    wanted = {f"{key}.npy" for key in expected}
    if len(names) != len(set(names)) or set(names) != wanted:
        extra = sorted(set(names) - wanted)[:5]
        missing = sorted(wanted - set(names))[:5]
        raise FormatError(f"{name} holds the wrong arrays (unexpected {extra}, missing {missing})")
    view = memoryview(data)
    arrays = {}
    for member in members:
        key = member.filename[: -len(".npy")]
        dtype, shape = expected[key]
        dtype = np.dtype(dtype)
        if member.compress_type != zipfile.ZIP_STORED or member.compress_size != member.file_size:
            raise FormatError(f"{name}: array {key} is compressed (np.savez never compresses)")
        start = _member_data_offset(data, member, name)
        end = start + member.file_size
        if end > len(data):
            raise FormatError(f"{name}: array {key} runs past the end of the file (truncated)")
        header = io.BytesIO(view[start: min(end, start + 65536)])
        try:
            version = np.lib.format.read_magic(header)
            if version == (1, 0):
                got_shape, fortran, got_dtype = np.lib.format.read_array_header_1_0(header)
            elif version == (2, 0):
                got_shape, fortran, got_dtype = np.lib.format.read_array_header_2_0(header)
            else:
                raise ValueError(f"unsupported .npy version {version}")
        except (ValueError, SyntaxError, TypeError, EOFError) as error:
            raise FormatError(f"{name}: array {key} has no valid .npy header ({error})") from None
        if got_dtype.hasobject:
            raise FormatError(f"{name}: array {key} holds Python objects (never unpickled)")
        if got_dtype != storage_dtype(dtype):
            raise FormatError(f"{name}: array {key} has dtype {got_dtype}, expected {dtype}")
        if tuple(got_shape) != tuple(shape):
            raise FormatError(f"{name}: array {key} has shape {tuple(got_shape)}, expected {tuple(shape)}")
        if fortran and len(shape) > 1:
            raise FormatError(f"{name}: array {key} is in Fortran order (distadam writes C order)")
        offset = start + header.tell()
        count = math.prod(shape)
        if end - offset != count * dtype.itemsize:
            raise FormatError(
                f"{name}: array {key} holds {end - offset} bytes of data, its header promises "
                f"{count * dtype.itemsize} (truncated or padded)"
            )
        arrays[key] = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)
    return arrays


def _member_data_offset(data: bytes, member: zipfile.ZipInfo, name: str) -> int:
    """Where a stored zip member's bytes start: after its local header, whose
    name and extra-field lengths may differ from the central directory's."""
    at = member.header_offset
    if at < 0 or at + 30 > len(data) or data[at: at + 4] != b"PK\x03\x04":
        raise FormatError(f"{name}: corrupt zip member {member.filename!r}")
    name_length, extra_length = struct.unpack("<HH", data[at + 26: at + 30])
    return at + 30 + name_length + extra_length


def write_npz(path, arrays: dict) -> tuple:
    """Write ``arrays`` as an uncompressed ``.npz`` at ``path`` (a fresh file,
    fsynced); returns (size, sha256) of what is on disk."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
    with os.fdopen(fd, "wb") as handle:
        np.savez(handle, **arrays)
        handle.flush()
        os.fsync(handle.fileno())
    return hash_file(path)


def write_bytes(path, data: bytes) -> None:
    """A fresh file at ``path`` with ``data``, fsynced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def fsync_directory(path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
