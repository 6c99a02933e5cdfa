"""The package's public names (protein_performer/__init__.py)."""
from __future__ import annotations

import subprocess
import sys

import protein_performer


def test_public_names_resolve_to_their_implementations():
    from protein_performer import Alphabet, PerformerConfig, PerformerOutput, ProteinPerformer, load_model
    from protein_performer.checkpoint import load_model as checkpoint_load_model
    from protein_performer.model import ProteinPerformer as model_class

    assert load_model is checkpoint_load_model and ProteinPerformer is model_class
    assert len(Alphabet()) == PerformerConfig(vocab_size=len(Alphabet())).vocab_size
    assert PerformerOutput.__name__ == "PerformerOutput"
    assert set(protein_performer.__all__) <= set(dir(protein_performer))
    assert protein_performer.__version__[0].isdigit()


def test_importing_the_package_does_not_import_torch():
    # Commands such as `python -m protein_performer.preprocess` start without the model stack.
    code = "import sys, protein_performer; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
