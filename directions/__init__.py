"""The pack's library: the math of each method and the direction data model, free of the host.

Imports torch, numpy, safetensors and einops only, so every formula can be tested on plain tensors.
"""
__version__ = "0.1.0"
