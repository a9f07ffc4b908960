"""The float64 reference the fast path is held to: ``selfextend.naive.naive_attention``.

It follows the paper's formula literally and shares no code with the fast path (``attention.py``)
or with ``positions.py``: rotate q and k (already rotated at their ordinary positions) to the grouped
positions, build the neighbor and the grouped score matrices, take the neighbor score where
``p_i - p_j < w`` and the grouped one elsewhere, one softmax over the merged row.
"""

from selfextend.naive import naive_attention as reference_attention

__all__ = ["reference_attention"]
