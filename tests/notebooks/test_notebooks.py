"""The notebooks run top to bottom on a checkpoint trained here, through the package's public API."""
from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK_DIR = REPO / "notebooks"


def load_runner():
    """notebooks/run_all.py (not a package module): the code path the committed outputs come from."""
    spec = importlib.util.spec_from_file_location("run_all", NOTEBOOK_DIR / "run_all.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run_all = load_runner()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny FAVOR+ MLM trained for a few steps on the bundled UniProt sample (the real training path)."""
    from protein_performer.train import compose_config, train

    run = tmp_path_factory.mktemp("notebook-run")
    cfg = compose_config([
        "model=tiny", "data=sample", "trainer=cpu", "logger=none", "~callbacks.lr_monitor", "test=false",
        f"data.fasta={REPO / 'data' / 'uniprot_sample.fasta'}", f"data.cache_dir={run / 'cache'}",
        "data.max_length=64", "data.tokens_per_batch=512", "data.num_workers=0",
        "trainer.max_steps=3", "trainer.val_check_interval=3", "trainer.limit_val_batches=1",
        "trainer.num_sanity_val_steps=0", "+trainer.enable_model_summary=false",
        "callbacks.progress_bar.refresh_rate=0", "optim.warmup_steps=1",
    ], output_dir=run)
    result = train(cfg)
    assert result.checkpoint is not None
    return Path(result.checkpoint)


def outputs(nb: nbformat.NotebookNode) -> tuple[str, int]:
    """(all text the cells printed, number of PNG figures)."""
    text, figures = [], 0
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if output.output_type == "stream":
                text.append(output.text)
            elif output.output_type in ("display_data", "execute_result"):
                figures += "image/png" in output.data
                text.append(output.data.get("text/plain", ""))
            elif output.output_type == "error":
                pytest.fail(f"{output.ename}: {output.evalue}")
    return "".join(text), figures


@pytest.mark.parametrize(
    ("name", "expected_text", "min_figures"),
    [
        ("attention_maps.ipynb", "Cys5-Cys55: rank", 4),
        ("amino_acid_similarity.ipynb", "Pearson r with BLOSUM62", 2),
        ("downstream.ipynb", "Q3 test accuracy", 1),
        ("homolog_attention.ipynb", "highest aligned lift", 4),
    ],
)
def test_notebook_runs_on_a_trained_checkpoint(checkpoint, name, expected_text, min_figures):
    # One thread: tiny models gain nothing from two, and lose much to contention on a shared machine.
    executed = run_all.execute(NOTEBOOK_DIR / name, checkpoint, fast=True, timeout=300,
                               env={"OMP_NUM_THREADS": "1"})
    text, figures = outputs(executed)
    assert expected_text in text
    assert figures >= min_figures


def test_homolog_notebook_shows_two_trained_kinds_and_the_member_band(checkpoint, tmp_path_factory):
    """A checkpoint with positions per member and FAVOR+'s band over member positions, beside a second one
    trained with plain FAVOR+: both shown as trained, softmax swapped in, masked queries measured."""
    from protein_performer.train import compose_config, train

    run = tmp_path_factory.mktemp("member-band-run")
    cfg = compose_config([
        "model=tiny", "data=sample", "trainer=cpu", "logger=none", "~callbacks.lr_monitor", "test=false",
        f"data.fasta={REPO / 'data' / 'uniprot_sample.fasta'}", f"data.cache_dir={run / 'cache'}",
        "data.max_length=64", "data.tokens_per_batch=512", "data.num_workers=0", "model.position_scope=member",
        "attention.exact_window=4", "attention.band_order=member",
        "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
        "trainer.num_sanity_val_steps=0", "+trainer.enable_model_summary=false",
        "callbacks.progress_bar.refresh_rate=0", "optim.warmup_steps=1",
    ], output_dir=run)
    member_band = train(cfg).checkpoint
    executed = run_all.execute(NOTEBOOK_DIR / "homolog_attention.ipynb", member_band, fast=True, timeout=300,
                               env={"OMP_NUM_THREADS": "1", "PP_CHECKPOINT_2": str(checkpoint)})
    text, figures = outputs(executed)
    assert "FAVOR+ with member band: 2 layers" in text and "\nFAVOR+: 2 layers" in text
    swapped = text.count("(swapped in, not trained)")
    assert swapped > 0 and swapped == text.count("softmax (swapped in, not trained)")  # only softmax is swapped in
    assert "the 15% of later residues shown as <mask>" in text
    assert "FAVOR+ with member band: highest aligned lift" in text
    assert figures >= 5  # three kinds' maps, the zoom and the profile


def _package_imports(source: str) -> list[tuple[str, str]]:
    """(module, name) of every `from protein_performer... import name` in the code (IPython magics skipped)."""
    code = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!")))
    return [(node.module, alias.name) for node in ast.walk(ast.parse(code))
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("protein_performer")
            for alias in node.names]


@pytest.mark.parametrize("name", run_all.NOTEBOOKS)
def test_notebooks_use_only_the_public_api(name):
    """Every name a notebook imports from the package exists and is public (a submodule, or listed in its
    module's __all__), so the notebooks show supported use and break here, not in a reader's hands, when a
    name moves."""
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    source = "\n".join(cell.source for cell in nb.cells if cell.cell_type == "code")
    imports = _package_imports(source)
    assert imports, f"{name} imports nothing from protein_performer"
    for module_name, imported in imports:
        module = importlib.import_module(module_name)
        if inspect.ismodule(getattr(module, imported, None)):  # a submodule: public unless _named
            assert not imported.startswith("_"), f"{name}: {module_name}.{imported} is private"
            continue
        assert hasattr(module, imported), f"{name}: {module_name} has no {imported}"
        assert imported in getattr(module, "__all__", ()), f"{name}: {module_name}.{imported} is not public"
    for line in source.splitlines():
        if "protein_performer" in line:
            assert "._" not in line and "import _" not in line, line
    assert any("parameters" in cell.metadata.get("tags", []) for cell in nb.cells)
