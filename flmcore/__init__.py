"""The bottom layer of flm-growth: what ``operators``, ``growth`` and ``stages`` all share.

Nothing here imports from the three packages above it (layers import downwards only).
"""
