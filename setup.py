"""Build of fastforward-attention: compiles csrc/ with nvcc into ffa/lib/libffa.so.

The library has a plain C ABI and links the CUDA runtime statically, so the package holds
no Python extension module and the wheel is tagged py3-none-<platform>: one wheel serves
every Python 3 and every PyTorch.

Environment:
  FFA_CUDA_ARCHS  semicolon-separated compute capabilities, default "75;80;86;89;90";
                  machine code for each, plus PTX of the highest for newer GPUs.
  FFA_NVCC_JOBS   parallel nvcc processes (default: number of CPUs).
  CUDA_HOME       where to look for bin/nvcc first; then PATH.

`python setup.py build_native` (or any install) builds the library in place; it is rebuilt
only when a source file or a flag changed.
"""

import concurrent.futures
import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

from setuptools import Command, setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

try:
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # setuptools < 70
    from wheel.bdist_wheel import bdist_wheel

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
LIB_DIR = ROOT / "ffa" / "lib"
LIB = LIB_DIR / "libffa.so"
STAMP = LIB_DIR / "libffa.build.json"
DEFAULT_ARCHS = "75;80;86;89;90"


def package_version():
    text = (ROOT / "ffa" / "_version.py").read_text()
    return re.search(r'__version__ = "([^"]+)"', text).group(1)


def find_nvcc():
    candidates = []
    if os.environ.get("CUDA_HOME"):
        candidates.append(Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc")
    on_path = shutil.which("nvcc")
    if on_path:
        candidates.append(Path(on_path))
    candidates.append(Path("/usr/local/cuda/bin/nvcc"))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    raise SystemExit(
        "fastforward-attention: nvcc was not found (looked in $CUDA_HOME/bin, PATH and "
        "/usr/local/cuda/bin); install the CUDA toolkit or set CUDA_HOME."
    )


def arch_flags():
    archs = [a.strip() for a in os.environ.get("FFA_CUDA_ARCHS", DEFAULT_ARCHS).split(";") if a.strip()]
    if not archs or not all(re.fullmatch(r"\d+[af]?", a) for a in archs):
        raise SystemExit(f"FFA_CUDA_ARCHS={os.environ.get('FFA_CUDA_ARCHS')!r}: expected e.g. '75;80;90'")
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    newest = max(archs, key=lambda a: int(re.match(r"\d+", a).group()))
    flags.append(f"-gencode=arch=compute_{newest},code=compute_{newest}")
    return archs, flags


def build_native(force=False):
    """Compile every csrc/**/*.cu in parallel and link libffa.so; skip if up to date."""
    nvcc = find_nvcc()
    archs, gencode = arch_flags()
    version = package_version()
    sources = sorted(CSRC.rglob("*.cu"))
    common = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC,-fvisibility=hidden", f'-DFFA_VERSION="{version}"', *gencode]
    digest = hashlib.sha256()
    for f in sorted(CSRC.rglob("*")):
        if f.is_file():
            digest.update(str(f.relative_to(CSRC)).encode() + f.read_bytes())
    digest.update(json.dumps([common, nvcc]).encode())
    stamp = {"sources": digest.hexdigest(), "archs": archs, "version": version}
    if not force and LIB.exists() and STAMP.exists() and json.loads(STAMP.read_text()) == stamp:
        return
    obj_dir = ROOT / "build" / "native"
    obj_dir.mkdir(parents=True, exist_ok=True)
    jobs = int(os.environ.get("FFA_NVCC_JOBS", os.cpu_count() or 1))
    print(f"fastforward-attention: compiling {len(sources)} CUDA files for sm_{', sm_'.join(archs)} "
          f"with {jobs} parallel nvcc", flush=True)

    def compile_one(src):
        obj = obj_dir / (src.relative_to(CSRC).as_posix().replace("/", "_") + ".o")
        subprocess.run([nvcc, *common, "-c", str(src), "-o", str(obj)], check=True)
        return obj

    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        objects = list(pool.map(compile_one, sources))
    LIB_DIR.mkdir(parents=True, exist_ok=True)
    tmp = LIB.with_suffix(".so.tmp")
    # Static cudart, with its symbols kept local so that they never bind to another runtime
    # loaded in the same process (PyTorch's), and ours never to theirs.
    subprocess.run([nvcc, "-shared", "-cudart", "static", *gencode, *map(str, objects), "-o", str(tmp),
                    "-Xlinker", "--exclude-libs,ALL", "-Xlinker", "-Bsymbolic"], check=True)
    os.replace(tmp, LIB)
    STAMP.write_text(json.dumps(stamp))


class BuildNative(Command):
    description = "compile the CUDA library into ffa/lib/libffa.so"
    user_options = [("force", "f", "rebuild even if up to date")]
    boolean_options = ["force"]

    def initialize_options(self):
        self.force = False

    def finalize_options(self):
        pass

    def run(self):
        build_native(force=self.force)


class BuildPyWithNative(build_py):
    def run(self):
        build_native()
        super().run()


class BinaryDistribution(Distribution):
    def has_ext_modules(self):
        return True


class PlatformWheel(bdist_wheel):
    """The library uses no Python C API: tag py3-none-<platform>."""

    def get_tag(self):
        _, _, plat = super().get_tag()
        return "py3", "none", plat


setup(
    version=package_version(),
    distclass=BinaryDistribution,
    cmdclass={"build_native": BuildNative, "build_py": BuildPyWithNative, "bdist_wheel": PlatformWheel},
    package_data={"ffa": ["lib/libffa.so"]},
)
