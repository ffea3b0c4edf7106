"""byolkit's trainer: BYOL pretraining, evaluation and fine-tuning.

Kept free of heavy imports so that `trainer.preprocess` (the preprocessing contract) can be
used by light clients without importing torch.
"""
__version__ = "0.1.0"
