"""Combiner (Ren et al. 2021): softmax attention with full support at O(L sqrt L) cost.

    reference.py   combiner_attention_weights: the dense [L, L] matrix from masks; default_block_size
    attention.py   combiner_attention: the blocked fast path (fixed and axial variants)
"""
from protein_performer.ops.combiner.attention import Variant, combiner_attention
from protein_performer.ops.combiner.reference import combiner_attention_weights, default_block_size

__all__ = ["Variant", "combiner_attention", "combiner_attention_weights", "default_block_size"]
