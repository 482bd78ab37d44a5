"""localssl: local self-supervised learning rules next to end-to-end BP-SSL.

Every layer (or block) learns from its own loss and no gradient crosses a
block; the same trainer runs end-to-end backprop baselines on equal terms.
"""
__version__ = "0.1.0"
