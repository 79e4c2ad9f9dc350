"""The per-device cache of tuned launch configurations: where it lives, what it holds, how it
is read (once per process, never breaking attention) and written (merged, atomically).

One JSON file per GPU model in `platformdirs.user_cache_dir("ffa")`, or in $FFA_TUNER_CACHE_DIR:

    {"format": 1,
     "key": {"gpu": "NVIDIA H100 80GB HBM3", "capability": "9.0", "sm_count": 132,
             "ffa_version": "0.1.0", "abi_version": 1, "kernel_version": 1},
     "entries": [{"dtype": "float16", "head_dim": 128, "group": 4, "batch_kv_heads": 32,
                  "length": 4096, "config": {"threads": 128, "heads_per_block": 4, "split_len": 256,
                             "tensor_cores": false},
                  "time_us": 18.2, "heuristic": {...}, "heuristic_us": 21.0}, ...]}

The file is named after the hardware only, and the whole key is checked on reading: after an
upgrade of FFA (or of its kernels) the old file is found, reported stale once, and replaced by
the next tuner run instead of lying around. Readers take no lock: writers replace the file
atomically, so a reader sees either the old or the new file, never a mix.
"""

import errno
import json
import math
import os
import re
import secrets
import threading
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .. import _lib
from .._version import __version__
from ..launch import (LaunchConfig, cluster_sizes, fit_splits, kernel_applies, length_bucket, library_facts,
                      max_heads_per_block, round_up, takes_features, thread_counts)

# Bump whenever a kernel change, or a change of how candidates are timed, can move the fastest
# configuration.
KERNEL_VERSION = 9
FORMAT = 1
ENV_DIR = "FFA_TUNER_CACHE_DIR"
LOCK_TIMEOUT_S = 60

DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
DTYPE_BY_NAME = {name: dtype for dtype, name in DTYPE_NAMES.items()}


class TunerCacheWarning(UserWarning):
    """The tuned-launch cache could not be used or written; FFA falls back to its heuristic."""


class CacheProblem(ValueError):
    """A cache file that exists but cannot be used (unreadable, corrupt or stale)."""


@dataclass(frozen=True)
class DeviceInfo:
    """The facts about a GPU that decide which cache file applies."""
    name: str
    capability: tuple  # (major, minor)
    sm_count: int


@dataclass(frozen=True)
class Entry:
    """The winner of one workload bucket, with the heuristic's time for comparison."""
    dtype: str
    head_dim: int
    group: int
    batch_kv_heads: int
    length: int
    config: LaunchConfig
    time_us: float
    heuristic: LaunchConfig
    heuristic_us: float  # None when the heuristic's configuration failed its check

    @property
    def bucket(self):
        return (self.dtype, self.head_dim, self.group, self.batch_kv_heads, self.length)

    def as_json(self):
        return {"dtype": self.dtype, "head_dim": self.head_dim, "group": self.group,
                "batch_kv_heads": self.batch_kv_heads, "length": self.length,
                "config": self.config.as_dict(), "time_us": self.time_us,
                "heuristic": self.heuristic.as_dict(), "heuristic_us": self.heuristic_us}


class Table:
    """Tuned configurations of one device, looked up by the runtime in plain Python."""

    def __init__(self, entries):
        self.entries = tuple(sorted(entries, key=lambda e: e.bucket))
        self._by_shape = {}
        for e in self.entries:
            self._by_shape.setdefault((e.dtype, e.head_dim, e.group, e.batch_kv_heads), []).append(
                (math.log2(e.length), e.length, e.config))

    def lookup(self, dtype, head_dim, group, batch_kv_heads, length):
        """The configuration of the measured bucket with the same dtype, head_dim, group and
        batch*kv_heads whose length is nearest (in log2; a tie goes to the longer one: its
        kernel choice was measured on a cache at least as large), fitted to this length
        (`fit_bucket`); None if there is none within MAX_OCTAVES (the heuristic's case)."""
        rows = self._by_shape.get((DTYPE_NAMES.get(dtype, dtype), head_dim, group, batch_kv_heads))
        if not rows or length < 1:
            return None
        y = math.log2(length)
        best, best_key = None, None
        for ly, ln, config in rows:  # a loop, not min(key=...): torch.compile traces this
            key = (abs(ly - y), -ln)
            if best_key is None or key < best_key:
                best, best_key = (ln, config), key
        return fit_bucket(*best, length) if best_key[0] <= MAX_OCTAVES else None

    def launch(self, dtype, head_dim, group, batch_kv_heads, length, max_len):
        """The tuned launch of a step at sequence length `length` over a cache of `max_len` positions
        (FastForwardAttn.launch_config's): the lookup for the length's bucket, capped at the cache,
        with splits that cover the whole cache (fit_splits); None where lookup has none."""
        config = self.lookup(dtype, head_dim, group, batch_kv_heads, min(length_bucket(length), max_len))
        return None if config is None else fit_splits(config, max_len)


# How far (in log2 of the length) a tuned bucket serves other lengths of its batch*kv_heads. Another
# batch*kv_heads takes the heuristic, computed for the size itself: on the H200, over 64 shapes in
# two runs, FastForwardAttn's launch is 1.012x and 1.020x the best candidate so, 1.018x and 1.025x
# when a bucket also served batch*kv_heads within an octave (its split count scaled to keep the
# blocks it had: 1.04-1.13x the best at 5 of the 14 shapes it served; bench/results/candidates-h200.md).
MAX_OCTAVES = 1


def fit_bucket(bucket_length, config, length):
    """A bucket's tuned configuration for another length: the same kernel, threads, heads per block
    and number of splits, so the split length scales with the length (multiples of 64; unsplit
    when one split would cover it all, and then without a cluster: clusters are of split blocks)."""
    if bucket_length == length or config.split_len == 0:
        return config
    splits = -(-bucket_length // config.split_len)
    split_len = round_up(-(-length // splits), 64) if splits > 1 else 0
    split_len = split_len if split_len < length else 0
    return replace(config, split_len=split_len, cluster=config.cluster if split_len else 1)


def describe_device(device):
    """DeviceInfo of a CUDA device (a torch.device or index); a DeviceInfo is returned as is,
    which is how tests stand in a fake GPU."""
    if isinstance(device, DeviceInfo):
        return device
    props = torch.cuda.get_device_properties(device)
    return DeviceInfo(props.name, (props.major, props.minor), props.multi_processor_count)


def device_key(info):
    """Everything a tuned configuration depends on: the GPU and the code that runs on it."""
    return {"gpu": info.name, "capability": f"{info.capability[0]}.{info.capability[1]}",
            "sm_count": info.sm_count, "ffa_version": __version__, "abi_version": _lib.ABI_VERSION,
            "kernel_version": KERNEL_VERSION}


def cache_dir():
    """$FFA_TUNER_CACHE_DIR if set, else the user cache directory for "ffa"."""
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR])
    import platformdirs
    return Path(platformdirs.user_cache_dir("ffa", appauthor=False))


def cache_file(info):
    """The device's file: GPU name, compute capability and SM count in its name."""
    slug = re.sub(r"[^a-z0-9]+", "-", info.name.lower()).strip("-") or "gpu"
    return cache_dir() / f"{slug}-sm{info.capability[0]}{info.capability[1]}-{info.sm_count}sms.json"


# ---- reading -------------------------------------------------------------------------------

def _config(obj, group):
    names = set(LaunchConfig.__dataclass_fields__)
    if not isinstance(obj, dict) or set(obj) != names:
        raise CacheProblem(f"a launch configuration {obj!r} is malformed")
    for flag in ("tensor_cores", "tma", "pdl"):
        if not isinstance(obj[flag], bool):
            raise CacheProblem(f"{flag}={obj[flag]!r} is not true or false")
    c = LaunchConfig(**{k: obj[k] if k in ("tensor_cores", "tma", "pdl") else _int(obj, k) for k in names})
    if c.threads not in thread_counts() or not 1 <= c.heads_per_block <= max_heads_per_block(c.kernel) \
            or group % c.heads_per_block or c.split_len < 0 or c.split_len % 16 or (c.tma and c.tensor_cores):
        raise CacheProblem(f"{c} is not a valid launch for group size {group}")
    if c.tma:
        low, high = library_facts()["tma"]["stages"]
        if not low <= c.stages <= high or not 16 <= c.tile_rows <= library_facts()["tma"]["tile_rows"][1] \
                or c.tile_rows % 16:
            raise CacheProblem(f"{c} has stages or tile_rows out of range")
    if c.cluster not in cluster_sizes() or (c.cluster > 1 and not (takes_features(c.kernel) and c.split_len)):
        raise CacheProblem(f"{c} has a cluster size that is not one of {cluster_sizes()} or not on a split launch "
                           "of the tensor-core or TMA kernel")
    if c.pdl and not takes_features(c.kernel):
        raise CacheProblem(f"{c} has pdl on a kernel that does not take it")
    return c


def _int(obj, name):
    value = obj.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise CacheProblem(f"{name}={value!r} is not an integer")
    return value


def _time(obj, name, optional=False):
    value = obj.get(name)
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise CacheProblem(f"{name}={value!r} is not a positive time")
    return float(value)


def _entry(obj):
    if not isinstance(obj, dict):
        raise CacheProblem(f"an entry is a {type(obj).__name__}, not an object")
    if obj.get("dtype") not in DTYPE_NAMES.values():
        raise CacheProblem(f"dtype {obj.get('dtype')!r} is not one of {sorted(DTYPE_NAMES.values())}")
    head_dim, group, bkv, length = (_int(obj, k) for k in ("head_dim", "group", "batch_kv_heads", "length"))
    if min(head_dim, group, bkv, length) < 1 or length & (length - 1):
        raise CacheProblem(f"entry sizes {head_dim, group, bkv, length} are out of range")
    config, heur = _config(obj.get("config"), group), _config(obj.get("heuristic"), group)
    for c in (config, heur):  # (at the kernel's own compute capability: the file is per device)
        if c.kernel != "cuda_cores" and not kernel_applies(c.kernel, DTYPE_BY_NAME[obj["dtype"]], head_dim, (99, 0)):
            raise CacheProblem(f"{c} uses the {c.kernel} kernel, which FFA does not have at {obj['dtype']} d{head_dim}")
    return Entry(obj["dtype"], head_dim, group, bkv, length, config, _time(obj, "time_us"), heur,
                 _time(obj, "heuristic_us", optional=True))


def _key_difference(theirs, ours):
    if not isinstance(theirs, dict):
        return f"it has no valid device key ({theirs!r})"
    diffs = [f"{k} {theirs.get(k)!r} (this is {ours[k]!r})" for k in ours if theirs.get(k) != ours[k]]
    return "it is stale: written for " + ", ".join(diffs or [f"key {theirs!r}"])


def read_file(path, key=None):
    """(key, entries) of the cache file at `path`; (None, []) if there is none. Raises
    CacheProblem if it cannot be used: unreadable, corrupt, or written for another `key`
    (key=None accepts any)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return None, []
    except OSError as e:
        raise CacheProblem(f"it could not be read ({e.strerror or e})") from None
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CacheProblem(f"it is corrupt or truncated (not valid JSON: {e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("entries"), list):
        raise CacheProblem("it is corrupt (no list of entries)")
    if doc.get("format") != FORMAT:
        raise CacheProblem(f"it is in cache format {doc.get('format')!r}, this FFA reads format {FORMAT}")
    if key is not None and doc.get("key") != key:
        raise CacheProblem(_key_difference(doc.get("key"), key))
    try:
        return doc.get("key"), [_entry(e) for e in doc["entries"]]
    except CacheProblem as e:
        raise CacheProblem(f"it is corrupt ({e})") from None


_tables = {}
_warned = set()
_state_lock = threading.Lock()


def _warn_once(topic, message):
    if topic in _warned:
        return
    _warned.add(topic)
    warnings.warn(message, TunerCacheWarning, stacklevel=3)


def load_table(device):
    """The tuned Table of `device` (torch.device or DeviceInfo), or None without a usable cache.

    The file is read on the first call for a device and memoized for the process. Any problem
    gives one TunerCacheWarning per file and None; this function never raises.
    """
    table = _tables.get(device, False)
    if table is not False:
        return table
    with _state_lock:
        path = None
        try:
            info = describe_device(device)
            path = cache_file(info)
            _, entries = read_file(path, device_key(info))
            table = Table(entries) if entries else None
        except Exception as e:  # noqa: BLE001 -- the cache must never break attention
            reason = str(e) if isinstance(e, CacheProblem) else f"it could not be loaded ({type(e).__name__}: {e})"
            _warn_once((str(path), "read"),
                       f"FFA ignores the tuned-launch cache {path or '(unknown path)'}: {reason}. Attention "
                       f"uses the built-in heuristic; rerun `python -m ffa.tuner` to retune, or "
                       f"`python -m ffa.tuner --clear` to delete the file.")
            table = None
        _tables[device] = table
    return table


def reset():
    """Forget memoized tables and issued warnings, as in a fresh process (for tests)."""
    with _state_lock:
        _tables.clear()
        _warned.clear()


# ---- writing -------------------------------------------------------------------------------

def _lock(path):
    import filelock
    return filelock.FileLock(str(path) + ".lock", timeout=LOCK_TIMEOUT_S)


def _write_all(fd, data):
    """os.write until every byte is out (a separate function so tests can fill the disk)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _atomic_write(path, text):
    """Write `text` to a fresh temporary file next to `path`, fsync it, and rename it over
    `path`: readers see the old file or the new one, never a partial write."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        try:
            _write_all(fd, text.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save(info, entries):
    """Merge `entries` into the device's file (they replace entries of the same bucket; a
    corrupt or stale file is replaced). Returns True when written; on a read-only directory,
    a full disk or a lock that never frees, warns once and returns False."""
    path = cache_file(info)
    key = device_key(info)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(path.parent, os.W_OK):
            raise PermissionError(errno.EACCES, "directory is not writable", str(path.parent))
        with _lock(path):
            for orphan in path.parent.glob(f"{path.name}.*.tmp"):  # left by a killed writer
                orphan.unlink(missing_ok=True)
            try:
                merged = {e.bucket: e for e in read_file(path, key)[1]}
            except CacheProblem:
                merged = {}
            merged.update((e.bucket, e) for e in entries)
            doc = {"format": FORMAT, "key": key,
                   "entries": [e.as_json() for e in sorted(merged.values(), key=lambda e: e.bucket)]}
            _atomic_write(path, json.dumps(doc, indent=1) + "\n")
    except OSError as e:
        _warn_once((str(path), "write"),
                   f"FFA's tuner could not write its cache {path} ({e}); the file is unchanged "
                   f"and tuned results are not kept. Set {ENV_DIR} to a writable directory.")
        return False
    with _state_lock:
        _tables.clear()
    return True


def clear(info):
    """Delete the device's file; True if there was one."""
    path = cache_file(info)
    if not path.exists():
        return False
    with _lock(path):
        path.unlink(missing_ok=True)
    return True
