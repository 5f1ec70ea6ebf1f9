"""lmforge as a user gets it: built into a wheel, installed into a fresh venv, its `lmforge`
command run from outside the source tree (pretrain, generate, eval); and the command line
finishing its work on torch's operators when the CPU kernels cannot be built."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from helpers import token_cache, write_corpus  # noqa: F401  (fixtures are registered by import)

from lmforge import kernels
from lmforge.hardware import CAPABILITY_OVERRIDE

REPO = Path(__file__).resolve().parents[1]
TINY_PRETRAIN = ["--tokenizer", "char", "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "16",
                 "--batch-size", "4", "--eval-every", "3", "--save-every", "3", "--no-progress", "--no-bf16"]
UNAVAILABLE = "lmforge: CPU kernels unavailable ("


def environment(**extra: str) -> dict[str, str]:
    """This process's environment plus `extra`, without PYTHONPATH: nothing may come from the tree."""
    return {**{key: value for key, value in os.environ.items() if key != "PYTHONPATH"}, **extra}


def run_command(argv: list, cwd: Path, **env: str) -> str:
    """Runs argv with these variables added to the environment; it must exit 0 without a
    traceback. Returns its stderr."""
    proc = subprocess.run([str(arg) for arg in argv], cwd=cwd, env=environment(**env), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, (argv, proc.returncode, proc.stderr)
    return proc.stderr


def printed_by(python: Path, code: str, cwd: Path) -> str:
    return subprocess.check_output([python, "-c", code], cwd=cwd, env=environment(), text=True).strip()


def build_wheel(folder: Path) -> Path:
    """A wheel of the source tree, built from a copy of it: setuptools keeps build/lib from one
    build to the next, so a build in the tree would ship files an earlier build left there (the
    very headers this tests for) and would write into a tree others are working in."""
    source = folder / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "lmforge", source / "lmforge", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    run_command([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "--no-index",
                 "--quiet", "-w", folder / "wheels"], cwd=source)
    (wheel,) = (folder / "wheels").glob("lmforge-*.whl")
    return wheel


def install_in_fresh_venv(wheel: Path, venv: Path) -> Path:
    """A new venv holding only the wheel's lmforge, with the dev venv's packages (torch...) on its
    path through a plain .pth line, which does not run the dev install's editable finder.
    Returns the venv's site-packages."""
    run_command([sys.executable, "-m", "venv", "--without-pip", venv], cwd=venv.parent)
    python = venv / "bin" / "python"
    run_command([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "--quiet",
                 wheel], cwd=venv.parent)
    site_packages = Path(printed_by(python, "import sysconfig; print(sysconfig.get_path('purelib'))", venv.parent))
    dev_paths = dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])
    (site_packages / "dev_venv_packages.pth").write_text("\n".join(dev_paths) + "\n")
    return site_packages


def test_the_installed_wheel_runs_pretrain_generate_and_eval(tmp_path):
    """The bug report: the wheel lacked csrc's headers and every command died on reading them.
    The installed copy also reuses the kernels built here (same code, same cache folder: the
    first build takes ~60 s, the reuse none), so it must load them, not fall back."""
    kernels_here = kernels.available()  # built, or loaded from the cache folder the installed copy will look in
    site_packages = install_in_fresh_venv(build_wheel(tmp_path), tmp_path / "venv")
    installed = site_packages / "lmforge"
    assert {path.name for path in (installed / "csrc").iterdir()} >= {path.name for path in kernels.CSRC.iterdir()}
    assert (installed / "csrc" / "vec_math.h").is_file() and (installed / "csrc" / "small_matmul.h").is_file()

    work = tmp_path / "work"  # outside the source tree: nothing can come from it
    corpus = write_corpus(work, name="c.txt")
    imported, kernels_there = printed_by(tmp_path / "venv" / "bin" / "python",
                                         "from lmforge import kernels; print(kernels.__file__, kernels.available())",
                                         work).rsplit(" ", 1)
    assert Path(imported) == installed / "kernels.py"  # not the source tree, through the dev venv's editable install
    assert kernels_there == str(kernels_here)  # the installed copy has every file the kernels need

    lmforge = tmp_path / "venv" / "bin" / "lmforge"
    cache = {"LMFORGE_CACHE_DIR": str(tmp_path / "token-cache")}
    commands = [["pretrain", "--data", corpus, *TINY_PRETRAIN, "--max-steps", "3", "--out", "run"],
                ["generate", "run", "--prompt", "The quick", "--temperature", "0", "--max-new-tokens", "8"],
                ["eval", "run", "--data", corpus, "--max-batches", "2"]]
    for command in commands:
        stderr = run_command([lmforge, *command], cwd=work, **cache)
        if kernels_here:
            assert UNAVAILABLE not in stderr, stderr


def test_pretrain_without_a_compiler_warns_once_and_finishes(tmp_path):
    """The command line when the kernels cannot be built (here no compiler; on any CPU, as
    lmforge is told it has AVX2): exit 0, one warning, no traceback."""
    corpus = write_corpus(tmp_path)
    stderr = run_command([sys.executable, "-m", "lmforge.cli", "pretrain", "--data", corpus, *TINY_PRETRAIN,
                          "--max-steps", "2", "--out", tmp_path / "run"], cwd=tmp_path,
                         CXX="/nonexistent/c++", TORCH_EXTENSIONS_DIR=str(tmp_path / "torch_extensions"),
                         LMFORGE_KERNELS="1", **{CAPABILITY_OVERRIDE: "AVX2"})
    warning_lines = [line for line in stderr.splitlines() if UNAVAILABLE in line]
    assert len(warning_lines) == 1 and "no C++ compiler" in warning_lines[0], stderr
    assert warning_lines == [line for line in stderr.splitlines() if line.strip()], stderr  # one line, nothing else
    assert (tmp_path / "run" / "model.safetensors").is_file()
