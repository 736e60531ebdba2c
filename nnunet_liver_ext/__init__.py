"""nnunet-liver-ext: liver and liver-tumor methods inside a stock nnU-Net v2.

Layers point one way (../shared/DESIGN.md): networks <- losses <- training <- trainers;
inference and evaluation read results; converters and the phantom write raw datasets.
"""
__version__ = "0.1.0"
