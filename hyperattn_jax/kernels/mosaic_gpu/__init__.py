"""Pallas Mosaic GPU kernels (Hopper: wgmma, TMA); today the tile-attention forward (`tiled_attention.py`)."""
