"""Files the package ships beside its code: the Hydra configs and the bundled demo FASTA.

The repository keeps them at its top level (`conf/`, `data/`), the one copy anyone edits. A wheel
carries them inside the package, as `protein_performer/conf/` and `protein_performer/bundled_data/`
(setup.py maps the top-level folders there at build time). So the package looks inside itself first,
which is what an installed wheel has, and otherwise beside itself, which is what a source tree has
(`python -m` from a clone, or `pip install -e .`).

Only this module knows where those files are:

    conf_dir()                  the directory Hydra composes every command's config from
    bundled_data_dir()          the demo FASTA files the data configs name
    resolve_data_path(path)     a data path from a config or the command line, as a file to open
    config_choices()            the groups and options `--help` lists (a leading _ marks a base, not a choice)
"""
from __future__ import annotations

import glob
import os
from pathlib import Path

__all__ = ["BUNDLED_DATA_FILES", "bundled_data_dir", "conf_dir", "config_choices", "resolve_data_path"]

_PACKAGE_DIR = Path(__file__).resolve().parent
# The data/ files a wheel carries: those the shipped configs name (data=sample, data=swissprot).
BUNDLED_DATA_FILES = ("uniprot_sample.fasta", "swissprot_subset.fasta.gz")
# How the configs name them: relative to a source tree's top level, e.g. data/uniprot_sample.fasta.
_BUNDLED_PREFIX = "data"


def _shipped(installed: str, source: str, marker: str) -> Path:
    """The directory `installed` inside the package if it holds `marker`, else `source` beside the package."""
    for candidate in (_PACKAGE_DIR / installed, _PACKAGE_DIR.parent / source):
        if (candidate / marker).is_file():
            return candidate
    raise FileNotFoundError(
        f"protein_performer is installed without its {source}/ files: neither {_PACKAGE_DIR / installed} nor "
        f"{_PACKAGE_DIR.parent / source} holds {marker}; reinstall the package (pip install .) or run from a "
        f"complete clone of the repository")


def conf_dir() -> Path:
    """The Hydra config directory: train.yaml, preprocess.yaml, embed.yaml and the group folders."""
    return _shipped("conf", "conf", "train.yaml")


def bundled_data_dir() -> Path:
    """The directory holding BUNDLED_DATA_FILES."""
    return _shipped("bundled_data", _BUNDLED_PREFIX, BUNDLED_DATA_FILES[0])


def resolve_data_path(path: str) -> str:
    """A FASTA or store path as a config or command line gives it, resolved to the file meant.

    Absolute paths, and relative paths (or globs) that match something under the working directory,
    are returned as given: a user's file always wins. A relative path that matches nothing there and
    names a bundled demo file as the configs do (`data/uniprot_sample.fasta`) becomes that file in
    the package, so data=sample and data=swissprot work from any directory. Anything else is returned
    unchanged, for the caller to report as missing.
    """
    if os.path.isabs(path) or glob.glob(os.path.expanduser(path)):
        return path
    parts = Path(path).parts
    if len(parts) == 2 and parts[0] == _BUNDLED_PREFIX and parts[1] in BUNDLED_DATA_FILES:
        try:
            return str(bundled_data_dir() / parts[1])
        except FileNotFoundError:
            return path
    return path


def config_choices() -> str:
    """'group: option, option' lines for conf/'s groups, as train --help lists them.

    Hydra's own list ($APP_CONFIG_GROUPS) also shows the shared bases (data/_base, experiment/_paper),
    which are not choices; conf/train.yaml's help template calls this instead (resolver pp_config_choices).
    """
    root = conf_dir()
    lines = []
    for group in sorted(path for path in root.iterdir() if path.is_dir()):
        options = sorted(path.stem for path in group.glob("*.yaml") if not path.stem.startswith("_"))
        if options:
            lines.append(f"{group.name}: {', '.join(options)}")
    return "\n".join(lines)


def _register_resolvers() -> None:
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("pp_config_choices", config_choices, replace=True)


_register_resolvers()
