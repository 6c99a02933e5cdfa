"""Where the package finds its configs and demo data: inside itself when installed, beside itself in a clone."""
from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from protein_performer import resources
from protein_performer.resources import BUNDLED_DATA_FILES, bundled_data_dir, conf_dir, resolve_data_path


def test_conf_dir_holds_the_three_commands_configs():
    assert {"train.yaml", "preprocess.yaml", "embed.yaml", "export.yaml"} <= {path.name for path in conf_dir().glob("*.yaml")}


def test_every_data_file_a_shipped_config_names_is_bundled():
    named = [OmegaConf.load(path).get("fasta") for path in sorted((conf_dir() / "data").glob("*.yaml"))]
    local = [fasta for fasta in named if isinstance(fasta, str) and not fasta.startswith("${")]
    assert local, "data=sample and data=swissprot name bundled files"
    for fasta in local:
        assert Path(fasta).parent == Path("data") and Path(fasta).name in BUNDLED_DATA_FILES
        assert (bundled_data_dir() / Path(fasta).name).is_file()


def test_bundled_data_is_found_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_data_path("data/uniprot_sample.fasta") == str(bundled_data_dir() / "uniprot_sample.fasta")
    assert Path(resolve_data_path("data/swissprot_subset.fasta.gz")).is_file()


def test_user_paths_resolve_against_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "uniprot_sample.fasta").write_text(">mine\nMKV\n")
    assert resolve_data_path("data/uniprot_sample.fasta") == "data/uniprot_sample.fasta"  # the user's file wins
    assert resolve_data_path("data/*.fasta") == "data/*.fasta"
    # Not bundled, or not named as the configs name bundled files: left for the caller to report as missing.
    for path in ("data/bpti.fasta", "elsewhere/uniprot_sample.fasta", "uniprot_sample.fasta", "missing.fa"):
        assert resolve_data_path(path) == path
    absolute = str(tmp_path / "nowhere" / "uniprot_sample.fasta")
    assert resolve_data_path(absolute) == absolute


def test_an_installed_package_uses_the_files_inside_it(tmp_path, monkeypatch):
    package = tmp_path / "site" / "protein_performer"
    (package / "conf").mkdir(parents=True)
    (package / "conf" / "train.yaml").write_text("{}\n")
    (package / "bundled_data").mkdir()
    for name in BUNDLED_DATA_FILES:
        (package / "bundled_data" / name).write_bytes(b"")
    monkeypatch.setattr(resources, "_PACKAGE_DIR", package)
    assert conf_dir() == package / "conf"
    assert bundled_data_dir() == package / "bundled_data"


def test_a_package_without_its_files_says_how_to_fix_it(tmp_path, monkeypatch):
    monkeypatch.setattr(resources, "_PACKAGE_DIR", tmp_path / "site" / "protein_performer")
    with pytest.raises(FileNotFoundError, match=r"installed without its conf/ files.*reinstall the package"):
        conf_dir()
    monkeypatch.chdir(tmp_path)
    assert resolve_data_path("data/uniprot_sample.fasta") == "data/uniprot_sample.fasta"
