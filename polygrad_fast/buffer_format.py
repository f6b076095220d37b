"""The trajectory buffer's persisted state: the state-dict schema and the ``.pgbuf`` file that holds it.

File layout: MAGIC | u32 version | u32 header length | 32-byte sha256(header + payload) | header (JSON) | payload.
The header lists the arrays (name, dtype, shape, offset, nbytes) of the state dict; the payload is their raw bytes.

Saving is atomic: the file is written to a temporary sibling ``.<name>.<pid>.<random>.tmp``, fsynced and renamed
over the target, so a reader sees the old file or the complete new one. A save killed before the rename leaves its
temporary file behind; the next save or load of the same target removes those of writers that no longer run.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import tempfile

import numpy as np

__all__ = ["DIM_KEYS", "FORMAT_MAGIC", "FORMAT_VERSION", "check_state_dict", "read_state", "remove_stale_temp_files",
           "write_state"]

FORMAT_MAGIC = b"PGFTRAJB"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sII32s")

DIM_KEYS = ("obs_dim", "act_dim", "sim_state_dim", "capacity")
_SCALARS = ("open_episode", "next_episode_id", "agg_n", "removals")


def _fmt_shape(shape) -> str:
    return "[" + ", ".join("L" if s is None else str(s) for s in shape) + "]"


def _int_field(state: dict, key: str, where: str) -> int:
    if key not in state:
        raise ValueError(f"{where}: missing {key!r}")
    a = np.asarray(state[key])
    if a.ndim != 0 or a.dtype.kind not in "biu":
        raise ValueError(f"{where}: {key!r} expected an integer scalar, got {a.dtype} array of shape {list(a.shape)}")
    return int(a)


def check_state_dict(state: dict, where: str = "state") -> dict:
    """Check a state dict for completeness and consistency; return it with arrays of the canonical dtypes.

    ``where`` starts every error message (the file's path when the state was read from one).
    """
    if not isinstance(state, dict):
        raise TypeError(f"{where}: expected a dict of arrays, got {type(state).__name__}")
    version = _int_field(state, "format_version", where)
    if version != FORMAT_VERSION:
        raise ValueError(f"{where}: trajectory buffer format version {version}, expected {FORMAT_VERSION}")
    dims = {k: _int_field(state, k, where) for k in DIM_KEYS}
    O, A, S, C = (dims[k] for k in DIM_KEYS)
    if O < 1 or A < 1 or S < 0 or C < 1:
        raise ValueError(f"{where}: expected obs_dim, act_dim, capacity >= 1 and sim_state_dim >= 0, got {dims}")
    D = O + A + 2
    spec = {"observations": (np.float32, (None, O)), "actions": (np.float32, (None, A)),
            "rewards": (np.float32, (None,)), "sim_states": (np.float64, (None, S)),
            "episode_ids": (np.int64, (None,)), "episode_lengths": (np.int64, (None,)),
            "terminated": (np.bool_, (None,)), "truncated": (np.bool_, (None,)),
            "episode_mean": (np.float64, (None, D)), "episode_m2": (np.float64, (None, D)),
            "agg_mean": (np.float64, (D,)), "agg_m2": (np.float64, (D,))}
    sd = dict(dims, format_version=FORMAT_VERSION)
    for key in _SCALARS:
        sd[key] = _int_field(state, key, where)
    for key, (dtype, shape) in spec.items():
        if key not in state:
            raise ValueError(f"{where}: missing {key!r}")
        a = np.asarray(state[key])
        if a.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, a.shape)):
            raise ValueError(f"{where}[{key!r}]: expected shape {_fmt_shape(shape)}, got {list(a.shape)}")
        if not np.can_cast(a.dtype, dtype, casting="same_kind"):
            raise ValueError(f"{where}[{key!r}]: expected dtype {np.dtype(dtype).name}, got {a.dtype}")
        sd[key] = np.ascontiguousarray(a, dtype=dtype)
    n, E = len(sd["rewards"]), len(sd["episode_lengths"])
    lens = sd["episode_lengths"]
    if not (len(sd["observations"]) == len(sd["actions"]) == len(sd["sim_states"]) == n):
        raise ValueError(f"{where}: per-step arrays have different lengths (observations "
                         f"{len(sd['observations'])}, actions {len(sd['actions'])}, rewards {n}, "
                         f"sim_states {len(sd['sim_states'])})")
    if any(len(sd[k]) != E for k in ("episode_ids", "terminated", "truncated", "episode_mean", "episode_m2")):
        raise ValueError(f"{where}: per-episode arrays have different lengths (expected {E} episodes)")
    if n > C or int(lens.sum()) != n or (E and lens.min() < 1):
        raise ValueError(f"{where}: episode lengths (sum {int(lens.sum())}) inconsistent with {n} stored steps "
                         f"and capacity {C}")
    if sd["open_episode"] and E == 0:
        raise ValueError(f"{where}: open episode flagged but no episode stored")
    closed = int(lens[: E - 1].sum()) if sd["open_episode"] else n
    if sd["agg_n"] != closed:
        raise ValueError(f"{where}: statistics cover {sd['agg_n']} steps, closed episodes hold {closed}")
    ids = sd["episode_ids"]
    if E and (np.any(np.diff(ids) <= 0) or int(ids[0]) < 0 or int(ids[-1]) >= sd["next_episode_id"]):
        raise ValueError(f"{where}: episode ids must be >= 0, increase and stay below next_episode_id")
    for key in ("observations", "actions", "rewards", "sim_states", "episode_mean", "episode_m2", "agg_mean", "agg_m2"):
        if not np.isfinite(sd[key]).all():
            raise ValueError(f"{where}[{key!r}]: contains NaN or inf; expected finite values")
    sd["open_episode"] = bool(sd["open_episode"])
    return sd


# ----------------------------------------------------------------------------------------------------------------------
# Temporary files of interrupted saves
# ----------------------------------------------------------------------------------------------------------------------


def _temp_pattern(path: str) -> re.Pattern:
    return re.compile(r"\." + re.escape(os.path.basename(path)) + r"\.(\d+)\.[A-Za-z0-9_]+\.tmp")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temp_files(path: str | os.PathLike) -> list[str]:
    """Remove the temporary files left by killed saves of ``path`` (writer no longer running); return them.

    A temp file of a live process (this one included: another thread may be saving) is left alone.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    pattern, removed = _temp_pattern(path), []
    try:
        names = os.listdir(directory)
    except OSError:  # missing or unreadable directory: the caller's own open/write reports it
        return removed
    for name in names:
        m = pattern.fullmatch(name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            try:
                os.unlink(os.path.join(directory, name))
                removed.append(name)
            except FileNotFoundError:  # removed by a concurrent cleanup
                pass
    return removed


# ----------------------------------------------------------------------------------------------------------------------
# Writing and reading
# ----------------------------------------------------------------------------------------------------------------------


def write_state(path: str | os.PathLike, sd: dict) -> None:
    """Atomically write the state dict ``sd`` to ``path`` (temp file in the same directory, fsync, rename, fsync dir).

    Any OSError names ``path`` (not the temp file) and leaves an existing file at ``path`` intact.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    arrays, offset = [], 0
    for name, value in sd.items():
        a = np.asarray(value)
        a = a if a.flags.c_contiguous else np.ascontiguousarray(a)  # (ascontiguousarray would make 0-d arrays 1-d)
        arrays.append((name, a, offset))
        offset += a.nbytes
    header = json.dumps({"arrays": [[name, a.dtype.str, list(a.shape), off, a.nbytes] for name, a, off in arrays],
                         "payload_nbytes": offset}).encode()
    digest = hashlib.sha256(header)
    for _, a, _ in arrays:
        digest.update(a.reshape(-1).view(np.uint8))
    remove_stale_temp_files(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.{os.getpid()}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(_PREFIX.pack(FORMAT_MAGIC, FORMAT_VERSION, len(header), digest.digest()))
            f.write(header)
            for _, a, _ in arrays:
                f.write(a.reshape(-1).view(np.uint8))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the complete new one
        tmp = None
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)  # make the rename itself durable
        finally:
            os.close(dfd)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise type(exc)(*((exc.errno,) if exc.errno is not None else ()),
                        f"cannot save the trajectory buffer to {path!r}: {reason}") from exc
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass


def read_state(path: str | os.PathLike) -> dict:
    """The state dict stored in ``path`` (not yet checked: see ``check_state_dict``).

    ValueError naming ``path`` on a wrong magic or version, a truncated or corrupt file; OSError (naming ``path``)
    when it cannot be read.
    """
    path = os.fspath(path)
    remove_stale_temp_files(path)
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < _PREFIX.size or data[:8] != FORMAT_MAGIC:
        raise ValueError(f"{path!r} is not a polygrad_fast trajectory buffer file (bad magic: expected "
                         f"{FORMAT_MAGIC!r}, got {data[:8]!r})")
    _, version, hlen, digest = _PREFIX.unpack_from(data)
    if version != FORMAT_VERSION:
        raise ValueError(f"{path!r}: trajectory buffer format version {version}, "
                         f"this polygrad_fast reads version {FORMAT_VERSION}")
    body = memoryview(data)[_PREFIX.size:]
    try:
        header = json.loads(bytes(body[:hlen]).decode())
        payload_nbytes = int(header["payload_nbytes"])
    except Exception:
        raise ValueError(f"{path!r}: corrupt or truncated trajectory buffer file (unreadable header)") from None
    if len(body) != hlen + payload_nbytes:
        raise ValueError(f"{path!r}: truncated or padded trajectory buffer file "
                         f"(payload {len(body) - hlen} bytes, header says {payload_nbytes})")
    if hashlib.sha256(body).digest() != digest:
        raise ValueError(f"{path!r}: trajectory buffer file checksum mismatch (corrupt)")
    payload = body[hlen:]
    sd = {}
    try:
        for name, dtype, shape, off, nbytes in header["arrays"]:
            sd[name] = np.frombuffer(payload[off:off + nbytes], dtype=np.dtype(dtype)).reshape(shape)
    except Exception as exc:  # a well-formed checksum over an ill-formed header: written by something else
        raise ValueError(f"{path!r}: corrupt trajectory buffer file header ({type(exc).__name__}: {exc})") from None
    return sd
