"""The environment report printed by `python -m ffa` (or `ffa.info()`), for bug reports.

Every probe is allowed to fail: the report says what is missing (no GPU, no driver, no
compiled library, no tuner cache) instead of raising, so it works on any machine.
"""

import ctypes
import platform
import sys
from pathlib import Path

import torch

from . import _lib
from ._version import __version__


def _library_lines():
    path = _lib.library_path()
    try:
        build = _lib.build_info()
    except _lib.FFAError as e:
        return [f"library        {path}", f"               not usable: {e}"]
    archs = ", ".join(f"sm_{a // 10}" for a in build.get("archs", []))
    cudart = build.get("cuda_runtime")
    runtime = f"{cudart // 1000}.{cudart % 1000 // 10}" if isinstance(cudart, int) else "?"
    kernels = [f"{name:<14} {', '.join(k['dtypes'])} at head_dim {', '.join(map(str, k['head_dims']))}, "
               f"compute capability {k['compute_capability']}+, up to {k['max_heads_per_block']} heads per block"
               for name, k in build.get("kernels", {}).items()]
    features = build.get("launch_features", {})
    takers = [name for name, k in build.get("kernels", {}).items() if k["code"] in features.get("kernels", [])]
    return [
        f"library        {path}",
        f"               loaded: ABI {build.get('abi')}, CUDA runtime {runtime} (static)",
        f"architectures  {archs or '?'}",
        "kernels",
        *(f"  {line}" for line in kernels),
        f"launch         programmatic dependent launch and clusters of "
        f"{', '.join(map(str, features.get('clusters', [])))} split blocks for {', '.join(takers) or 'no kernel'}, "
        f"compute capability {features.get('compute_capability', '?')}+",
    ]


def _driver_version():
    """The CUDA driver's version as 'major.minor', or a sentence saying why it is unknown."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return "no CUDA driver (libcuda.so.1 not found)"
    version = ctypes.c_int()
    if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0:
        return "unknown (cuDriverGetVersion failed)"
    return f"{version.value // 1000}.{version.value % 1000 // 10}"


def _gpu_lines():
    if not torch.cuda.is_available():
        why = "this torch is a CPU build" if torch.version.cuda is None else "torch sees no CUDA device"
        return [f"GPU            none ({why})"]
    usable = _lib.available()
    lines = []
    for index in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(index)
        if not usable:
            covered = "coverage unknown (library not usable)"
        else:
            try:
                _lib.check_device(index)
                covered = "covered by the library"
            except (_lib.FFAError, ValueError) as e:
                covered = f"NOT covered: {e}"
        lines.append(f"GPU {index:<11d}{torch.cuda.get_device_name(index)} (sm_{major}{minor}), {covered}")
    return lines


def _tuner_lines():
    try:  # imported here so that the rest of the report works even if the tuner is broken
        from .tuner.cache import cache_dir

        directory = cache_dir()
    except Exception as e:  # the report must not fail because of the tuner
        return [f"tuner cache    unknown ({type(e).__name__}: {e})"]
    if not directory.is_dir():
        return [f"tuner cache    {directory} (does not exist: no tuned tables, heuristic launches)"]
    files = sorted(p for p in directory.iterdir() if p.is_file())
    if not files:
        return [f"tuner cache    {directory} (empty: heuristic launches)"]
    return [f"tuner cache    {directory}"] + [f"               {p.name} ({p.stat().st_size} bytes)" for p in files]


def report():
    """The report as one string, one fact per line."""
    cuda = f", CUDA {torch.version.cuda}" if torch.version.cuda else ""
    lines = [
        f"ffa            {__version__} ({Path(__file__).parent})",
        f"python         {platform.python_version()} on {platform.platform()}",
        f"torch          {torch.__version__}{cuda}",
        *_library_lines(),
        *_gpu_lines(),
        f"CUDA driver    {_driver_version()}",
        *_tuner_lines(),
    ]
    return "\n".join(lines)


def info(file=None):
    """Print the environment report (to stdout unless `file` is given)."""
    print(report(), file=file or sys.stdout)
