"""The package's public names (protein_performer/__init__.py)."""
from __future__ import annotations

import subprocess
import sys

import torch

import protein_performer


def test_public_names_resolve_to_their_implementations():
    from protein_performer import Alphabet, PerformerConfig, PerformerOutput, ProteinPerformer, load_model
    from protein_performer.checkpoint import load_model as checkpoint_load_model
    from protein_performer.data import Alphabet as data_alphabet
    from protein_performer.model import ProteinPerformer as model_class

    assert load_model is checkpoint_load_model and ProteinPerformer is model_class and Alphabet is data_alphabet
    missing = [name for name in protein_performer.__all__ if not hasattr(protein_performer, name)]
    assert not missing, f"protein_performer.__all__ names {missing}, which do not resolve"
    assert protein_performer.__version__[0].isdigit()

    # The public config builds the public model, whose forward returns the public output type.
    alphabet = Alphabet()
    config = PerformerConfig(vocab_size=len(alphabet), d_model=16, n_layers=1, n_heads=2, d_ff=32,
                             attention="softmax", pad_idx=alphabet.pad_idx)
    ids = torch.tensor([[alphabet.cls_idx, *alphabet.encode("MKTAYIAK").tolist(), alphabet.eos_idx]])
    output = ProteinPerformer(config)(ids)
    assert isinstance(output, PerformerOutput)
    assert output.logits.shape == (1, ids.shape[1], len(alphabet))


def test_embedding_names_stay_importable_from_the_command_module():
    """protein_performer.embed became a command line over protein_performer.embedding; its names stay."""
    import protein_performer.embed as command
    import protein_performer.embedding as embedding

    for name in ("embed", "embed_fasta", "load_embeddings", "Embeddings", "EmbedError", "ProteinEmbedding"):
        assert getattr(command, name) is getattr(embedding, name), name


def test_importing_the_package_does_not_import_torch():
    # Commands such as `python -m protein_performer.preprocess` start without the model stack.
    code = "import sys, protein_performer; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
