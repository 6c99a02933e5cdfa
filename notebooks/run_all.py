"""Execute the notebooks on a checkpoint and save them with their outputs (figures included).

    python notebooks/run_all.py outputs/<date>/<time>/checkpoints/last.ckpt        # all of them, in place
    python notebooks/run_all.py <ckpt> notebooks/downstream.ipynb                  # just one
    python notebooks/run_all.py <ckpt> --fast --output-dir /tmp/nb                 # smoke run, repo untouched
    python notebooks/run_all.py my-model                        # an exported model directory works the same

The checkpoint reaches each notebook as the environment variable PP_CHECKPOINT (and --fast as
PP_NOTEBOOK_FAST=1), read by its parameters cell; notebooks run from this folder, so they find the
repository's data/ at ../data. The test suite calls `execute` the same way on a tiny checkpoint.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK_DIR = Path(__file__).resolve().parent
NOTEBOOKS = ("attention_maps.ipynb", "amino_acid_similarity.ipynb", "downstream.ipynb", "homolog_attention.ipynb")


def execute(notebook: Path, checkpoint: Path, *, fast: bool = False, timeout: int = 3600,
            kernel_name: str = "python3", env: Mapping[str, str] | None = None) -> nbformat.NotebookNode:
    """Run every cell of `notebook` in a fresh kernel and return it with outputs (the file is not written).

    The kernel is the Python running this function (jupyter_client starts kernel specs whose command is
    `python` with sys.executable), so it sees the same installed package. `env` adds variables to the
    kernel's environment (the tests pin OMP_NUM_THREADS there).
    """
    nb = nbformat.read(notebook, as_version=4)
    env = {**os.environ, **(env or {}), "PP_CHECKPOINT": str(Path(checkpoint).resolve()),
           "PP_NOTEBOOK_FAST": "1" if fast else "0"}
    client = NotebookClient(nb, timeout=timeout, kernel_name=kernel_name,
                            resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    client.execute(env=env)
    return nb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a .ckpt from training (or its run directory), or an exported model directory")
    parser.add_argument("notebooks", nargs="*", type=Path, help="notebooks to run (default: all)")
    parser.add_argument("--fast", action="store_true", help="tiny subsets: a smoke run, not results")
    parser.add_argument("--output-dir", type=Path, help="write executed notebooks here instead of in place")
    args = parser.parse_args(argv)
    if not args.checkpoint.exists():
        print(f"run_all: error: checkpoint {args.checkpoint} does not exist; run `make train` first", file=sys.stderr)
        return 2
    notebooks = args.notebooks or [NOTEBOOK_DIR / name for name in NOTEBOOKS]
    for notebook in notebooks:
        start = time.perf_counter()
        executed = execute(notebook, args.checkpoint, fast=args.fast)
        target = (args.output_dir / notebook.name) if args.output_dir else notebook
        target.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(executed, target)
        print(f"{notebook.name}: {time.perf_counter() - start:.0f} s -> {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
