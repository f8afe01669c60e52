"""Installing: the GPU set-up keeps an installed CUDA torch, the CPU set-up pins torch, and README, CI,
pyproject.toml and the code agree.

The install checks are pip dry runs, offline: a stand-in `torch 2.9.1+cu128` distribution (metadata
only) sits first on PYTHONPATH, where pip sees it as installed; a metadata-only wheel of the pinned
torch is the one package pip can find (`--no-index --find-links`), so the CPU requirements can resolve
to it; everything else is satisfied by the packages installed in this environment. Pip's configuration
files and PIP_* variables are left out so the machine's own index settings play no part.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import tomllib
import zipfile
from importlib.metadata import distribution, packages_distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from conftest import bash_blocks, readme_section

REPO = Path(__file__).resolve().parent.parent
CUDA_TORCH = "2.9.1+cu128"
CPU_SET_UP = "pip install -r requirements.txt"
GPU_SET_UP = "pip install -r requirements-gpu.txt"


def _pyproject() -> dict:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def _torch_floor() -> Version:
    """The lowest torch pyproject.toml accepts (its `torch>=X` requirement)."""
    for line in _pyproject()["project"]["dependencies"]:
        requirement = Requirement(line)
        if requirement.name == "torch":
            (spec,) = [s for s in requirement.specifier if s.operator == ">="]
            return Version(spec.version)
    raise AssertionError("pyproject.toml does not require torch")


def _pinned_torch() -> str:
    pins = re.findall(r"^torch==(\S+)", (REPO / "requirements.txt").read_text(), re.MULTILINE)
    assert len(pins) == 1, "requirements.txt should pin torch once"
    return pins[0]


# ---- pip against a stand-in CUDA torch ------------------------------------------------------------------

def _write_installed_dist(site: Path, version: str) -> None:
    """The files pip reads for an installed distribution: METADATA, INSTALLER, RECORD."""
    dist_info = site / f"torch-{version}.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n")
    (dist_info / "INSTALLER").write_text("pip\n")
    (dist_info / "RECORD").write_text("".join(f"{dist_info.name}/{name},,\n" for name in ("METADATA", "INSTALLER", "RECORD")))


def _write_wheel(folder: Path, version: str) -> None:
    """A wheel of torch `version` that holds only its metadata: enough for pip to resolve it."""
    dist_info = f"torch-{version}.dist-info"
    files = {
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n",
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test_install\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{dist_info}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{dist_info}/RECORD"])
    folder.mkdir(parents=True)
    with zipfile.ZipFile(folder / f"torch-{version}-py3-none-any.whl", "w") as wheel:
        for name, content in files.items():
            wheel.writestr(name, content)


@pytest.fixture(scope="module")
def pip_env(tmp_path_factory) -> dict:
    """Where the stand-in torch lies, the wheel folder, and a `run(args)` for pip under that PYTHONPATH."""
    root = tmp_path_factory.mktemp("install")
    site, wheels = root / "site", root / "wheels"
    _write_installed_dist(site, CUDA_TORCH)
    _write_wheel(wheels, _pinned_torch())
    env = {key: value for key, value in os.environ.items() if not key.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))

    def run(args: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pip", *args], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=120)

    return {"root": root, "wheels": wheels, "run": run}


def _dry_run(pip_env: dict, requirements_file: str) -> dict[str, str]:
    """Name -> version of what `pip install -r requirements_file` would install."""
    report = pip_env["root"] / f"{requirements_file}.json"
    done = pip_env["run"](["install", "--dry-run", "--no-index", "--find-links", str(pip_env["wheels"]),
                           "--no-build-isolation", "--quiet", "--report", str(report), "-r", requirements_file])
    assert done.returncode == 0, done.stdout + done.stderr
    return {item["metadata"]["name"]: item["metadata"]["version"] for item in json.loads(report.read_text())["install"]}


def test_pip_sees_the_stand_in_as_the_installed_torch(pip_env):
    done = pip_env["run"](["list", "--format", "json"])
    assert done.returncode == 0, done.stderr
    assert {"name": "torch", "version": CUDA_TORCH} in json.loads(done.stdout)


def test_gpu_requirements_keep_an_installed_cuda_torch(pip_env):
    installs = _dry_run(pip_env, "requirements-gpu.txt")
    assert "ipu-trainer" in installs, installs  # the project itself was resolved, dependencies and all
    assert "torch" not in installs, installs


def test_cpu_requirements_replace_it_with_the_pinned_torch(pip_env):
    """The contrast: the pin makes pip swap the CUDA build out, which is why GPU users need the other file."""
    installs = _dry_run(pip_env, "requirements.txt")
    assert installs.get("torch") == _pinned_torch(), installs


# ---- README, CI and pyproject.toml agree --------------------------------------------------------------

def test_readme_gives_one_cpu_command_and_the_gpu_file():
    blocks = bash_blocks(readme_section("Set up"))
    assert len(blocks[0]) == 1 and blocks[0][0].endswith(CPU_SET_UP), blocks[0]
    assert any(GPU_SET_UP in line for block in blocks[1:] for line in block), blocks


def test_ci_runs_the_readme_commands_verbatim():
    ci_lines = {line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()}
    (set_up,) = bash_blocks(readme_section("Set up"))[0]
    (tests,) = bash_blocks(readme_section("Tests"))[0]
    assert set_up in ci_lines and tests in ci_lines, (set_up, tests)


def test_torch_floor_is_stated_once_and_covers_transformers():
    floor = _torch_floor()
    assert f"torch {floor} or newer" in " ".join(readme_section("Set up").split())
    assert Version(_pinned_torch()) >= floor
    # transformers switches itself off below its own torch floor: ours must not be lower.
    for line in distribution("transformers").requires or []:
        requirement = Requirement(line)
        if requirement.name == "torch" and requirement.marker and "torch" in str(requirement.marker):
            (spec,) = [s for s in requirement.specifier if s.operator == ">="]
            assert floor >= Version(spec.version), f"transformers needs torch>={spec.version}"
            return
    pytest.fail("transformers states no torch requirement for its `torch` extra")


def _imported_top_level_modules(paths: list[Path]) -> set[str]:
    names = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def test_every_third_party_import_of_the_package_and_scripts_is_a_dependency():
    code = sorted((REPO / "ipu_trainer").rglob("*.py")) + sorted(REPO.glob("*.py"))
    local = {"ipu_trainer"} | {path.stem for path in REPO.glob("*.py")}
    third_party = _imported_top_level_modules(code) - set(sys.stdlib_module_names) - local
    declared = {canonicalize_name(Requirement(line).name) for line in _pyproject()["project"]["dependencies"]}
    module_to_dists = packages_distributions()
    missing = {module for module in third_party
               if not {canonicalize_name(d) for d in module_to_dists.get(module, [module])} & declared}
    assert "tfrecord" in third_party  # prepare_dataset.py's import is seen
    assert not missing, f"imported but not in pyproject.toml dependencies: {sorted(missing)}"
    assert "pytest" not in declared  # test tools live in the `test` extra
