"""Lightning training of ProteinPerformer: the LightningModule, callbacks and multi-device strategies.

The command line is `python -m protein_performer.train` (protein_performer/train.py).
"""
from protein_performer.training.callbacks import BatchFingerprints, Checkpoint, FeatureRedraw, Throughput
from protein_performer.training.module import ProteinLM, TokenMetrics, lr_factor
from protein_performer.training.targets import member_index, target_masks, target_set_names

__all__ = ["BatchFingerprints", "Checkpoint", "FeatureRedraw", "ProteinLM", "Throughput", "TokenMetrics", "lr_factor",
           "member_index", "target_masks", "target_set_names"]
