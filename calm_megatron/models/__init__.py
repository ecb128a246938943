"""Model math: the chunk autoencoder, the backbone, the energy head, CALM and the AR baseline.

Nothing here imports ``training/`` or ``data/``: models are pure functions of their inputs.
"""
