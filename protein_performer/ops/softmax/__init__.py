"""Exact softmax attention: the O(L^2) baseline every approximation is measured against.

    reference.py   softmax_attention_weights: the materialised matrix (the reference and attention maps)
    attention.py   softmax_attention: torch's scaled_dot_product_attention
"""
from protein_performer.ops.softmax.attention import softmax_attention
from protein_performer.ops.softmax.reference import softmax_attention_weights

__all__ = ["softmax_attention", "softmax_attention_weights"]
