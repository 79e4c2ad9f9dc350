"""The binding: finds libffa.so, declares its C signatures, turns status codes into exceptions.

Nothing here knows about torch; ops.py fills a DecodeParams from tensors.
"""

import ctypes
import json
import os
from pathlib import Path

from ._version import __version__

ABI_VERSION = 9  # must equal FFA_ABI_VERSION in csrc/ffa.h

OK, INVALID_ARGUMENT, UNSUPPORTED, NO_KERNEL_IMAGE, CUDA_ERROR, ABI_MISMATCH = range(6)
DTYPE_CODES = {"float16": 0, "bfloat16": 1, "float32": 2}


class FFAError(RuntimeError):
    """An error reported by FFA's native library (a CUDA error, a missing kernel image)."""


class UnsupportedError(ValueError):
    """A valid request that this build or GPU has no kernel for (a head_dim not compiled, a
    tensor-core launch on a GPU without them or with too little shared memory)."""


class DecodeParams(ctypes.Structure):
    """Mirror of ffa_decode_params in csrc/ffa.h, field for field."""

    _fields_ = [
        ("abi_version", ctypes.c_int64),
        ("dtype", ctypes.c_int64),
        ("batch", ctypes.c_int64),
        ("heads", ctypes.c_int64),
        ("kv_heads", ctypes.c_int64),
        ("head_dim", ctypes.c_int64),
        ("max_len", ctypes.c_int64),
        ("q", ctypes.c_void_p),
        ("q_stride_b", ctypes.c_int64),
        ("q_stride_h", ctypes.c_int64),
        ("new_k", ctypes.c_void_p),
        ("new_k_stride_b", ctypes.c_int64),
        ("new_k_stride_h", ctypes.c_int64),
        ("new_v", ctypes.c_void_p),
        ("new_v_stride_b", ctypes.c_int64),
        ("new_v_stride_h", ctypes.c_int64),
        ("k_cache", ctypes.c_void_p),
        ("k_stride_b", ctypes.c_int64),
        ("k_stride_h", ctypes.c_int64),
        ("k_stride_s", ctypes.c_int64),
        ("v_cache", ctypes.c_void_p),
        ("v_stride_b", ctypes.c_int64),
        ("v_stride_h", ctypes.c_int64),
        ("v_stride_s", ctypes.c_int64),
        ("out", ctypes.c_void_p),
        ("out_stride_b", ctypes.c_int64),
        ("out_stride_h", ctypes.c_int64),
        ("pos_ptr", ctypes.c_void_p),
        ("pos_bits", ctypes.c_int64),
        ("pos_scalar", ctypes.c_int64),
        ("start_ptr", ctypes.c_void_p),
        ("start_bits", ctypes.c_int64),
        ("start_scalar", ctypes.c_int64),
        ("softmax_scale", ctypes.c_double),
        ("prune_p", ctypes.c_double),
        ("softcap", ctypes.c_double),
        ("sinks", ctypes.c_void_p),
        ("threads", ctypes.c_int64),
        ("heads_per_block", ctypes.c_int64),
        ("split_len", ctypes.c_int64),
        ("kernel", ctypes.c_int64),
        ("stages", ctypes.c_int64),
        ("tile_rows", ctypes.c_int64),
        ("pdl", ctypes.c_int64),
        ("cluster", ctypes.c_int64),
        ("workspace", ctypes.c_void_p),
        ("workspace_bytes", ctypes.c_int64),
        ("stream", ctypes.c_void_p),
    ]


READ_RANGES = 2  # FFA_READ_RANGES in csrc/ffa.h


class ReadParams(ctypes.Structure):
    """Mirror of ffa_read_params in csrc/ffa.h: the read ceiling's ranges."""

    _fields_ = [
        ("abi_version", ctypes.c_int64),
        ("ptr", ctypes.c_void_p * READ_RANGES),
        ("bytes", ctypes.c_int64 * READ_RANGES),
        ("bulk", ctypes.c_int64),
        ("stream", ctypes.c_void_p),
    ]


def library_path():
    """$FFA_LIBRARY if set, else the libffa.so shipped inside the package."""
    return Path(os.environ.get("FFA_LIBRARY", Path(__file__).parent / "lib" / "libffa.so"))


_lib = None
_load_error = None
_opened = {}  # resolved path -> handle, for use_library


def _open(path):
    """The library file at `path`, its ABI and version checked and its signatures declared;
    raises FFAError with the reason when it cannot be used."""
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise FFAError(f"FFA's CUDA library could not be loaded from {path} ({e}); "
                       "build it with `python setup.py build_native` or reinstall the package") from None
    try:
        lib.ffa_abi_version.restype = ctypes.c_int64
        lib.ffa_version.restype = ctypes.c_char_p
        abi, version = lib.ffa_abi_version(), lib.ffa_version().decode()
    except AttributeError as e:
        abi, version = None, f"unknown ({e})"
    if abi != ABI_VERSION or version != __version__:
        raise FFAError(f"{path} is FFA {version} (ABI {abi}) but the Python package is {__version__} "
                       f"(ABI {ABI_VERSION}); rebuild it with `python setup.py build_native`")
    for name in ("ffa_build_info", "ffa_last_error"):
        getattr(lib, name).restype = ctypes.c_char_p
    lib.ffa_status_string.restype = ctypes.c_char_p
    lib.ffa_status_string.argtypes = [ctypes.c_int]
    lib.ffa_workspace_bytes.argtypes = [ctypes.POINTER(DecodeParams), ctypes.POINTER(ctypes.c_int64)]
    lib.ffa_check_device.argtypes = [ctypes.c_int]
    lib.ffa_decode.argtypes = [ctypes.POINTER(DecodeParams)]
    lib.ffa_stream_check.argtypes = [ctypes.c_void_p]
    lib.ffa_read.argtypes = [ctypes.POINTER(ReadParams)]
    return lib


def load():
    """The loaded library; raises FFAError with the reason when it cannot be used."""
    global _lib, _load_error
    if _lib is not None:
        return _lib
    if _load_error is not None:
        raise FFAError(_load_error)
    try:
        _lib = _open(library_path())
    except FFAError as e:
        _load_error = str(e)
        raise
    return _lib


def use_library(path):
    """Make the library file at `path` the one every later FFA call goes to (each file is
    opened once and checked as load() checks the default one): for comparing builds in one
    process (bench/compare_builds.py)."""
    global _lib, _load_error
    key = str(Path(path).resolve())
    if key not in _opened:
        _opened[key] = _open(key)
    _lib, _load_error = _opened[key], None


def available():
    try:
        load()
        return True
    except FFAError:
        return False


def build_info():
    return json.loads(load().ffa_build_info().decode())


def _raise(status, context):
    lib = load()
    msg = f"{context}: {lib.ffa_last_error().decode()}"
    if status == UNSUPPORTED:
        raise UnsupportedError(msg)
    if status == INVALID_ARGUMENT:
        raise ValueError(msg)
    raise FFAError(f"FFA {lib.ffa_status_string(status).decode()}: {msg}")


def check_device(index):
    status = load().ffa_check_device(index)
    if status != OK:
        _raise(status, f"cuda:{index}")


def workspace_bytes(params):
    out = ctypes.c_int64()
    status = load().ffa_workspace_bytes(ctypes.byref(params), ctypes.byref(out))
    if status != OK:
        _raise(status, "ffa_workspace_bytes")
    return out.value


def read(params):
    """ffa_read: one read of the ranges in `params` (a ReadParams) on its stream."""
    status = load().ffa_read(ctypes.byref(params))
    if status != OK:
        _raise(status, "ffa_read")


# FFA_DEBUG_SYNC=1: wait for the stream before and after every decode, so that an asynchronous
# GPU fault is reported here, as FFA's kernel's or as earlier work's, instead of at some later
# synchronization as an anonymous CUDA error. Costs two synchronizations per call.
DEBUG_SYNC = os.environ.get("FFA_DEBUG_SYNC", "") not in ("", "0")


def decode(params):
    lib = load()
    if DEBUG_SYNC and lib.ffa_stream_check(params.stream) != OK:
        raise FFAError(f"CUDA work queued before this FFA call failed on the GPU (not FFA's kernel): "
                       f"{lib.ffa_last_error().decode()}")
    status = lib.ffa_decode(ctypes.byref(params))
    if status != OK:
        _raise(status, "ffa_decode")
    if DEBUG_SYNC and lib.ffa_stream_check(params.stream) != OK:
        raise FFAError(f"FFA's decode kernel failed on the GPU: {lib.ffa_last_error().decode()}")
