"""shrinkflow: train large, then compress.

The pure library: config, data, modelling, compression, evaluation, gates,
registry. It never imports Prefect and importing it has no side effects
(no directories created, no env vars changed, no torch import).
"""

__version__ = "0.1.0"
