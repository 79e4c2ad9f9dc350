"""Packaging: how setup.py finds nvcc and picks architectures, the `python -m ffa` report, the
test extra and the README commands that CI runs, and (run by scripts/build_wheel.sh with
FFA_EXPECT_INSTALLED=1) the installed wheel itself."""

import ast
import importlib.util
import json
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

import ffa
from ffa import _lib
from ffa.info import report

ROOT = Path(__file__).resolve().parent.parent
SETUP_PY = ROOT / "setup.py"
PYPI_PARTS = ("nvidia-cuda-nvcc", "nvidia-nvvm", "nvidia-cuda-crt", "nvidia-cuda-runtime")


def repository_module(path, name):
    """A program of the repository imported as module `name`; skipped when an installed wheel is
    tested (only tests/ and pyproject.toml are there)."""
    if not path.is_file():
        pytest.skip(f"{path.name} is not beside tests/ (testing an installed wheel)")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def setup_module():
    """setup.py imported as a module (its setup() call only runs as __main__)."""
    return repository_module(SETUP_PY, "ffa_setup")


def fake_executable(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


def fake_pypi_toolchain(site, versions, cccl=True):
    """A site-packages holding nvidia/cu13/bin/nvcc, the CCCL headers' directory (if `cccl`) and
    dist-info for each (name, version)."""
    nvcc = fake_executable(site / "nvidia" / "cu13" / "bin" / "nvcc")
    if cccl:
        (site / "nvidia" / "cu13" / "include" / "cccl").mkdir(parents=True)
    for name, version in versions.items():
        info = site / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    return nvcc


def test_cuda_home_comes_first(setup_module, tmp_path):
    nvcc = fake_executable(tmp_path / "cuda" / "bin" / "nvcc")
    other = fake_executable(tmp_path / "other" / "nvcc")
    env = {"CUDA_HOME": str(tmp_path / "cuda"), "PATH": str(other.parent)}
    assert setup_module.find_nvcc(env, dirs=[]) == nvcc


def test_cuda_home_without_nvcc_is_an_error(setup_module, tmp_path):
    with pytest.raises(SystemExit, match="CUDA_HOME=.* has no bin/nvcc"):
        setup_module.find_nvcc({"CUDA_HOME": str(tmp_path)}, dirs=[])


def test_path_comes_before_pypi(setup_module, tmp_path):
    on_path = fake_executable(tmp_path / "bin" / "nvcc")
    fake_pypi_toolchain(tmp_path / "site", {n: "13.5.37" for n in PYPI_PARTS})
    assert setup_module.find_nvcc({"PATH": str(on_path.parent)}, dirs=[tmp_path / "site"]) == on_path


def test_pypi_toolchain_is_found(setup_module, tmp_path):
    nvcc = fake_pypi_toolchain(tmp_path, {n: "13.5.37" for n in PYPI_PARTS})
    assert setup_module.find_nvcc({"PATH": ""}, dirs=[tmp_path]) == nvcc


def test_mixed_pypi_toolchain_is_refused(setup_module, tmp_path):
    fake_pypi_toolchain(tmp_path, {**{n: "13.0.88" for n in PYPI_PARTS}, "nvidia-nvvm": "13.5.37"})
    with pytest.raises(SystemExit, match=r"mixed releases .*nvidia-nvvm==13\.5\.37"):
        setup_module.find_nvcc({"PATH": ""}, dirs=[tmp_path])


def test_incomplete_pypi_toolchain_is_refused(setup_module, tmp_path):
    fake_pypi_toolchain(tmp_path, {n: "13.5.37" for n in PYPI_PARTS if n != "nvidia-cuda-runtime"}, cccl=False)
    with pytest.raises(SystemExit) as e:
        setup_module.find_nvcc({"PATH": ""}, dirs=[tmp_path])
    assert "nvidia-cuda-runtime is missing" in str(e.value) and "nvidia-cuda-cccl is missing" in str(e.value)
    assert 'pip install "cuda-toolkit[nvcc,cccl]==13.5.*"' in str(e.value)


def test_no_nvcc_says_how_to_get_one(setup_module, tmp_path):
    with pytest.raises(SystemExit) as e:
        setup_module.find_nvcc({"PATH": str(tmp_path)}, dirs=[tmp_path])
    assert "no nvcc found" in str(e.value) and 'pip install "cuda-toolkit[nvcc,cccl]==13.5.*"' in str(e.value)


def test_default_archs_are_the_supported_release_archs(setup_module):
    assert setup_module.select_archs(None, {"75", "80", "86", "87", "89", "90"}) == ["75", "80", "86", "89", "90"]
    assert setup_module.select_archs(None, {"75", "90", "100", "120"}) == ["75", "90", "100", "120"]


def test_requested_archs_are_checked(setup_module):
    supported = {"75", "80", "90", "100"}
    assert setup_module.select_archs("100; 80;90a", supported) == ["80", "90a", "100"]
    assert setup_module.select_archs("90,80", supported) == ["80", "90"]
    with pytest.raises(SystemExit, match="expected e.g."):
        setup_module.select_archs("sm_90", supported)
    with pytest.raises(SystemExit, match="sm_120"):
        setup_module.select_archs("90;120", supported)


def test_ptx_of_the_newest_arch(setup_module):
    flags = setup_module.gencode_flags(["80", "90", "100"])
    assert flags[:3] == [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ("80", "90", "100")]
    assert flags[3:] == ["-gencode=arch=compute_100,code=compute_100"]


def test_report_names_version_torch_and_tuner_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("FFA_TUNER_CACHE_DIR", str(tmp_path))
    (tmp_path / "NVIDIA_H100_80GB_HBM3.json").write_text("{}")
    text = report()
    assert text.startswith(f"ffa            {ffa.__version__} ")
    assert f"torch          {torch.__version__}" in text
    assert "CUDA driver    " in text
    assert f"tuner cache    {tmp_path}\n" in text and "NVIDIA_H100_80GB_HBM3.json (2 bytes)" in text
    if not torch.cuda.is_available():
        assert "GPU            none (" in text
    if _lib.available():
        assert "  tensor_cores   float16, bfloat16 at head_dim 64, 128, compute capability 8.0+, up to 8 heads" in text
        assert "  tma            float16, bfloat16 at head_dim 64, 128, 256, compute capability 9.0+, up to 32 heads" in text
        assert ("launch         programmatic dependent launch and clusters of 1, 2, 4, 8 split blocks for "
                "tensor_cores, tma, compute capability 9.0+") in text


def test_report_without_tuner_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("FFA_TUNER_CACHE_DIR", str(tmp_path / "missing"))
    assert "does not exist" in report()


def test_report_without_library(monkeypatch, tmp_path):
    missing = tmp_path / "libffa.so"
    monkeypatch.setenv("FFA_LIBRARY", str(missing))
    monkeypatch.setattr(_lib, "_lib", None)
    monkeypatch.setattr(_lib, "_load_error", None)
    text = report()
    assert f"library        {missing}\n               not usable: " in text
    assert "architectures" not in text and "tensor cores" not in text


def test_python_m_ffa(tmp_path):
    """`python -m ffa` runs from any directory and prints the report."""
    env = {**os.environ, "PYTHONPATH": str(Path(ffa.__file__).parent.parent)}
    out = subprocess.run([sys.executable, "-m", "ffa"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"ffa            {ffa.__version__} ")
    assert "library        " in out.stdout


@pytest.mark.gpu
def test_report_says_the_gpu_is_covered():
    assert re.search(r"^GPU 0 +.*\(sm_\d+\), covered by the library$", report(), re.M), report()


@pytest.fixture(scope="module")
def installed():
    """The installed distribution, when scripts/build_wheel.sh (or cibuildwheel) tests a wheel."""
    if os.environ.get("FFA_EXPECT_INSTALLED") != "1":
        pytest.skip("FFA_EXPECT_INSTALLED=1 is set when testing an installed wheel")
    return metadata.distribution("fastforward-attention")


def test_imported_from_the_installed_wheel(installed):
    assert Path(installed.locate_file("ffa/__init__.py")).resolve() == Path(ffa.__file__).resolve()
    direct_url = installed.read_text("direct_url.json")
    assert direct_url is None or not json.loads(direct_url).get("dir_info", {}).get("editable")


def test_wheel_tag_and_metadata(installed):
    wheel = installed.read_text("WHEEL")
    tags = re.findall(r"^Tag: (.+)$", wheel, re.M)
    # auditwheel may add a legacy alias (manylinux2014_x86_64) beside manylinux_2_17_x86_64.
    assert tags and all(re.fullmatch(r"py3-none-manylinux(_\d+_\d+|2014)_(x86_64|aarch64)", t) for t in tags), tags
    assert "Root-Is-Purelib: false" in wheel
    assert installed.metadata["Requires-Python"] == ">=3.9"
    runtime = [r for r in installed.requires if "extra ==" not in r]
    names = {re.match(r"[A-Za-z0-9_.-]+", r).group().lower(): r for r in runtime}
    assert set(names) == {"torch", "platformdirs", "filelock"}, runtime
    assert ">=2.4" in names["torch"]


def test_installed_library_matches_the_build(installed):
    info = _lib.build_info()
    assert info["version"] == ffa.__version__
    assert Path(_lib.library_path()).resolve() == Path(installed.locate_file("ffa/lib/libffa.so")).resolve()
    archs = os.environ.get("FFA_CUDA_ARCHS")
    if archs:
        expected = sorted(int(re.match(r"\d+", a).group()) * 10 for a in re.split(r"[;,\s]+", archs) if a)
        assert sorted(info["archs"]) == expected


def test_every_python_file_compiles_on_this_python():
    """Programs outside the package (bench/, scripts/, examples) run on every Python the package
    supports, not only the GPU machine's: syntax newer than this interpreter's fails here."""
    root = SETUP_PY.parent
    if not (root / "bench").is_dir():
        pytest.skip("the repository is not beside tests/ (testing an installed wheel)")
    files = [p for d in ("bench", "scripts", "ffa", "tests") for p in (root / d).rglob("*.py")] + list(root.glob("*.py"))
    failures = []
    for path in files:
        try:
            compile(path.read_text(), str(path), "exec")
        except SyntaxError as e:
            failures.append(f"{path.relative_to(root)}:{e.lineno}: {e.msg}")
    assert len(files) > 20 and not failures, failures


def distribution_name(requirement):
    """'transformers==5.17.0' -> 'transformers'; names compared as PEP 503 normalizes them."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement).group()).lower()


def test_the_test_extra_lists_every_package_the_tests_import():
    """The test suite's packages are listed in one place, pyproject.toml's test extra: every module
    that tests/ imports (and setup.py, which these tests import) is the standard library's, this
    repository's, or comes from a distribution that the extra or the package's own dependencies name.
    A package that only arrives as another's dependency would vanish with that dependency."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    named = {distribution_name(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]}
    files = sorted((ROOT / "tests").glob("*.py")) + ([SETUP_PY] if SETUP_PY.is_file() else [])
    own = {p.stem for p in files} | {"ffa", "ff_attention"}
    standard = set(sys.stdlib_module_names) | {"tomllib"}  # tomli stands in for it before Python 3.11
    imported = {}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module]
            else:
                continue
            for module in modules:
                imported.setdefault(module.split(".")[0], path.name)
    providers = metadata.packages_distributions()  # installed ones; tomli is not, from Python 3.11 on
    missing = [f"{module} (imported by {where}; installed by {sorted(providers.get(module, [])) or 'nothing'})"
               for module, where in sorted(imported.items()) if module not in standard | own
               and not {distribution_name(d) for d in providers.get(module, [module])} & named]
    assert {"transformers", "hypothesis", "numpy"} <= set(imported) and not missing, missing


def readme_commands():
    """scripts/readme_commands.py, which .ci/run runs to get the README's commands."""
    return repository_module(ROOT / "scripts" / "readme_commands.py", "readme_commands")


def test_ci_runs_the_readme_commands_which_install_the_test_extra():
    """.ci/run takes the README's two Quick start commands from scripts/readme_commands.py, so they
    cannot drift apart; the first installs this source tree, the second its test extra."""
    module = readme_commands()
    install, tests = module.quick_start_commands((ROOT / "README.md").read_text())
    assert re.match(r"pip install \. &&", install) and "python example.py" in install
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert re.match(r'pip install "\.\[test\]" &&', tests) and "test" in extras
    assert "python -m pytest -q tests" in tests
    assert "scripts/readme_commands.py" in (ROOT / ".ci" / "run").read_text()


def test_readme_commands_refuses_a_quick_start_it_cannot_read():
    module = readme_commands()
    with pytest.raises(ValueError, match="no '## Quick start' section"):
        module.quick_start_commands("# FFA\n")
    three = "## Quick start\n" + "```bash\npip install .\n```\n" * 3 + "## Next\n"
    with pytest.raises(ValueError, match="two bash blocks of one line each"):
        module.quick_start_commands(three)
    two_lines = "## Quick start\n```bash\npip install .\npython example.py\n```\n```bash\npytest\n```\n"
    with pytest.raises(ValueError, match="two bash blocks of one line each"):
        module.quick_start_commands(two_lines)
    after = "## Quick start\n```bash\na\n```\n```bash\nb\n```\n## Layout\n```bash\nc\n```\n"
    assert module.quick_start_commands(after) == ["a", "b"]  # blocks of later sections are not commands
