"""Build of fastforward-attention: compiles csrc/ with nvcc into ffa/lib/libffa.so.

The library has a plain C ABI and links the CUDA runtime statically, so the package holds
no Python extension module and the wheel is tagged py3-none-<platform>: one wheel serves
every Python 3 and every PyTorch.

Environment:
  FFA_CUDA_ARCHS  compute capabilities separated by ';' or ','; machine code for each, plus PTX
                  of the highest for newer GPUs. Default: those of RELEASE_ARCHS that the
                  nvcc in use can compile.
  FFA_NVCC_JOBS   parallel nvcc processes (default: number of CPUs).
  CUDA_HOME       where to look for bin/nvcc first.

nvcc is looked for in $CUDA_HOME/bin, then on PATH, then in the CUDA 13 toolchain from PyPI
(see PYPI_INSTALL), so that a machine without any CUDA install can build.

`python setup.py build_native` (or any install) builds the library in place; it is rebuilt
only when a source file or a flag changed.
"""

import concurrent.futures
import hashlib
import json
import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

from setuptools import Command, setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
LIB_DIR = ROOT / "ffa" / "lib"
LIB = LIB_DIR / "libffa.so"
STAMP = LIB_DIR / "libffa.build.json"
RELEASE_ARCHS = ("75", "80", "86", "89", "90", "100", "120")
# The PyPI CUDA 13 toolchain: nvcc and the packages it runs with, which must share one release
# (nvidia-cuda-nvcc does not pin them), plus the CCCL headers that cuda_fp16.h includes. NVIDIA's
# cuda-toolkit metapackage pins a matching set.
PYPI_TOOLCHAIN = ("nvidia-cuda-nvcc", "nvidia-nvvm", "nvidia-cuda-crt", "nvidia-cuda-runtime")
PYPI_INSTALL = 'pip install "cuda-toolkit[nvcc,cccl]==13.5.*"'


def package_version():
    text = (ROOT / "ffa" / "_version.py").read_text()
    return re.search(r'__version__ = "([^"]+)"', text).group(1)


def site_dirs():
    """Every site-packages this interpreter knows, including the environment's own when pip
    builds in an isolated environment (whose sys.path hides it)."""
    dirs = [Path(p) for p in sys.path if p]
    paths = sysconfig.get_paths()
    dirs += [Path(paths["purelib"]), Path(paths["platlib"]), Path(site.getusersitepackages())]
    return list(dict.fromkeys(d for d in dirs if d.is_dir()))


def pypi_nvcc(dirs):
    """nvcc of the PyPI CUDA 13 toolchain in one of `dirs`, after checking that the toolchain is
    complete and its parts share one release (a newer NVVM beside an older nvcc fails with a PTX
    version error, missing CCCL headers with "nv/target: No such file")."""
    for d in dirs:
        root = d / "nvidia" / "cu13"
        if not (root / "bin" / "nvcc").is_file():
            continue
        versions = {}
        for dist in metadata.distributions(path=[str(d)]):
            name = dist.metadata["Name"].lower()
            if name in PYPI_TOOLCHAIN:
                versions[name] = dist.version
        problems = [f"{n} is missing" for n in PYPI_TOOLCHAIN if n not in versions]
        if len({".".join(v.split(".")[:2]) for v in versions.values()}) > 1:
            problems.append("mixed releases " + ", ".join(f"{n}=={v}" for n, v in sorted(versions.items())))
        if not (root / "include" / "cccl").is_dir():
            problems.append("nvidia-cuda-cccl is missing")
        if problems:
            raise SystemExit(f"fastforward-attention: the PyPI CUDA toolchain in {d} is unusable "
                             f"({'; '.join(problems)}); install a matching set with: {PYPI_INSTALL}")
        return root / "bin" / "nvcc"
    return None


def find_nvcc(env=os.environ, dirs=None):
    """Path of the nvcc to build with: $CUDA_HOME/bin, else PATH, else the PyPI toolchain in
    `dirs` (default: this interpreter's site-packages)."""
    if env.get("CUDA_HOME"):
        nvcc = Path(env["CUDA_HOME"]) / "bin" / "nvcc"
        if not os.access(nvcc, os.X_OK):
            raise SystemExit(f"fastforward-attention: CUDA_HOME={env['CUDA_HOME']} has no bin/nvcc.")
        return nvcc
    on_path = shutil.which("nvcc", path=env.get("PATH", ""))
    if on_path:
        return Path(on_path)
    nvcc = pypi_nvcc(site_dirs() if dirs is None else dirs)
    if nvcc:
        return nvcc
    raise SystemExit(
        "fastforward-attention: no nvcc found in $CUDA_HOME/bin, on PATH or from PyPI; set CUDA_HOME to "
        f"a CUDA toolkit, or get the CUDA 13 compiler with: {PYPI_INSTALL}")


def supported_archs(nvcc):
    """Compute capabilities this nvcc can compile machine code for, e.g. {'75', '90', '100'}."""
    out = subprocess.run([str(nvcc), "--list-gpu-code"], capture_output=True, text=True, check=True).stdout
    return set(re.findall(r"\bsm_(\d+)\b", out))


def _arch_key(arch):
    """Sort key of '90', '90a', '100f': by compute capability, then suffix."""
    number = re.match(r"\d+", arch).group()
    return int(number), arch[len(number):]


def select_archs(requested, supported):
    """The architectures to compile: FFA_CUDA_ARCHS (`requested`, each must be supported) or,
    when it is None, the supported part of RELEASE_ARCHS."""
    if requested is None:
        archs = [a for a in RELEASE_ARCHS if a in supported]
    else:
        archs = [a for a in re.split(r"[;,\s]+", requested) if a]
        if not archs or not all(re.fullmatch(r"\d+[af]?", a) for a in archs):
            raise SystemExit(f"fastforward-attention: FFA_CUDA_ARCHS={requested!r}: expected e.g. '75;80;90'")
        unknown = [a for a in archs if re.match(r"\d+", a).group() not in supported]
        if unknown:
            raise SystemExit(f"fastforward-attention: FFA_CUDA_ARCHS asks for sm_{', sm_'.join(unknown)}, which "
                             f"this nvcc cannot compile (it knows sm_{', sm_'.join(sorted(supported, key=int))})")
    if not archs:
        raise SystemExit("fastforward-attention: this nvcc supports none of sm_" + ", sm_".join(RELEASE_ARCHS))
    return sorted(archs, key=_arch_key)


def gencode_flags(archs):
    """Machine code for every arch, and PTX of the newest so that later GPUs can JIT it."""
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    return flags + [f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}"]


def build_native(force=False):
    """Compile every csrc/**/*.cu in parallel and link libffa.so; skip if up to date."""
    nvcc = find_nvcc()
    archs = select_archs(os.environ.get("FFA_CUDA_ARCHS"), supported_archs(nvcc))
    gencode = gencode_flags(archs)
    version = package_version()
    sources = sorted(CSRC.rglob("*.cu"))
    common = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC,-fvisibility=hidden", f'-DFFA_VERSION="{version}"', *gencode]
    digest = hashlib.sha256()
    for f in sorted(CSRC.rglob("*")):
        if f.is_file():
            digest.update(str(f.relative_to(CSRC)).encode() + f.read_bytes())
    digest.update(json.dumps([common, str(nvcc)]).encode())
    stamp = {"sources": digest.hexdigest(), "archs": archs, "version": version}
    if not force and LIB.exists() and STAMP.exists() and json.loads(STAMP.read_text()) == stamp:
        return
    obj_dir = ROOT / "build" / "native"
    obj_dir.mkdir(parents=True, exist_ok=True)
    jobs = int(os.environ.get("FFA_NVCC_JOBS", os.cpu_count() or 1))
    print(f"fastforward-attention: compiling {len(sources)} CUDA files for sm_{', sm_'.join(archs)} "
          f"with {jobs} parallel nvcc ({nvcc})", flush=True)

    def compile_one(src):
        obj = obj_dir / (src.relative_to(CSRC).as_posix().replace("/", "_") + ".o")
        subprocess.run([str(nvcc), *common, "-c", str(src), "-o", str(obj)], check=True)
        return obj

    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        objects = list(pool.map(compile_one, sources))
    LIB_DIR.mkdir(parents=True, exist_ok=True)
    tmp = LIB.with_suffix(".so.tmp")
    # Static cudart, with its symbols kept local so that they never bind to another runtime
    # loaded in the same process (PyTorch's), and ours never to theirs.
    subprocess.run([str(nvcc), "-shared", "-cudart", "static", *gencode, *map(str, objects), "-o", str(tmp),
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


# Guarded so that tests can import the helpers above; pip and `python setup.py` run it as __main__.
if __name__ == "__main__":
    setup(
        version=package_version(),
        distclass=BinaryDistribution,
        cmdclass={"build_native": BuildNative, "build_py": BuildPyWithNative, "bdist_wheel": PlatformWheel},
        package_data={"ffa": ["lib/libffa.so"]},
    )
