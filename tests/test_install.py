"""The package as a user installs it: a wheel built from the repository, installed without its
dependencies into a directory of its own, its console commands run from outside the repository."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from protein_performer.data import Alphabet, TokenStore
from protein_performer.data.fasta import read_fasta
from protein_performer.resources import BUNDLED_DATA_FILES

REPO_ROOT = Path(__file__).resolve().parent.parent
# What a build needs from the repository (a copy is built, so no build/ or .egg-info lands in the clone).
BUILD_INPUTS = ("pyproject.toml", "setup.py", "README.md", "conf", "data", "protein_performer")
COMMANDS = ("train", "preprocess", "embed", "export")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the repository, offline, with the running environment's setuptools."""
    root = tmp_path_factory.mktemp("build")
    source = root / "source"
    for name in BUILD_INPUTS:
        path = REPO_ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            source.mkdir(exist_ok=True)
            shutil.copy2(path, source / name)
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                             "--disable-pip-version-check", "-q", "-w", str(root / "dist"), str(source)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    (built,) = (root / "dist").glob("protein_performer-*.whl")
    return built


def test_wheel_carries_every_config_and_the_bundled_demo_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {f"protein_performer/conf/{path.relative_to(REPO_ROOT / 'conf').as_posix()}"
               for path in (REPO_ROOT / "conf").rglob("*.yaml")}
    assert configs and configs <= names
    bundled = {name for name in names if name.startswith("protein_performer/bundled_data/")}
    assert bundled == {f"protein_performer/bundled_data/{name}" for name in BUNDLED_DATA_FILES}
    assert not {name for name in names if name.startswith(("conf/", "data/"))}, "no top-level folders of the repo"
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    for command in COMMANDS:
        assert f"protein-performer-{command} = protein_performer.{command}:main" in entry_points


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """The wheel installed with `pip install --no-deps --target`: <dir>/protein_performer, <dir>/bin/<commands>."""
    target = tmp_path_factory.mktemp("installed")
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--disable-pip-version-check",
                             "-q", "--target", str(target), str(wheel)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return target


def _run(installed: Path, cwd: Path, *command: str) -> subprocess.CompletedProcess:
    """Run in `cwd` (outside the repository) with only the installed wheel on the path before the
    environment's own packages (which hold the dependencies)."""
    env = {**os.environ, "PYTHONPATH": str(installed), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
           "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(list(command), cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{command} exited with {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.mark.slow
def test_installed_commands_run_from_any_directory(installed, tmp_path):
    work = tmp_path / "elsewhere"
    work.mkdir()
    assert REPO_ROOT not in work.parents

    # The wheel's package runs (not the source tree, not an editable install), and finds its files inside itself.
    where = _run(installed, work, sys.executable, "-c",
                 "import protein_performer, protein_performer.resources as r; print(protein_performer.__file__); "
                 "print(r.conf_dir()); print(r.resolve_data_path('data/uniprot_sample.fasta'))").stdout.split()
    package = installed / "protein_performer"
    assert where == [str(package / "__init__.py"), str(package / "conf"),
                     str(package / "bundled_data" / "uniprot_sample.fasta")]

    for command in COMMANDS:
        executable = str(installed / "bin" / f"protein-performer-{command}")
        help_text = _run(installed, work, executable, "--help").stdout
        assert f"{command} is powered by Hydra" in help_text and "== Config ==" in help_text
        job = OmegaConf.create(_run(installed, work, executable, "--cfg", "job").stdout)
        if command == "train":
            assert job.data.fasta == "data/uniprot_sample.fasta" and job.attention.kind == "favor"
            assert "attention: combiner, favor, favor_member64, favor_relu, favor_rpe, softmax" in help_text
        else:  # preprocess and embed read input=, export reads checkpoint=; all write output=
            assert OmegaConf.is_missing(job, "checkpoint" if command == "export" else "input")
            assert OmegaConf.is_missing(job, "output")
    # Overrides reach the composed config as they do with python -m.
    job = OmegaConf.create(_run(installed, work, str(installed / "bin" / "protein-performer-train"), "--cfg", "job",
                                "experiment=demo", "attention=softmax").stdout)
    assert job.data.fasta == "data/swissprot_subset.fasta.gz" and job.attention.kind == "softmax"

    # One real preprocess: a few UniProtKB records, relative paths against the working directory.
    records = list(read_fasta(REPO_ROOT / "data" / "uniprot_sample.fasta"))[:8]
    (work / "few.fasta").write_text("".join(f">{r.description}\n{r.sequence}\n" for r in records))
    printed = _run(installed, work, str(installed / "bin" / "protein-performer-preprocess"), "input=few.fasta",
                   "output=few.h5", "progress=false", "background_reader=false").stdout
    assert "wrote few.h5" in printed
    alphabet = Alphabet()
    with TokenStore(work / "few.h5") as store:
        stored = {store.accession(i): alphabet.decode(store.tokens(i)) for i in range(len(store))}
    assert stored == {r.accession: r.sequence for r in records}
    assert sorted(path.name for path in work.iterdir()) == ["few.fasta", "few.h5", "outputs"]
