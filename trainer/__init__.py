"""byolkit's trainer: BYOL pretraining, evaluation and fine-tuning (trainer.finetune).

The preprocessing contract it trains under lives in the torch-free package `contract`.
"""
__version__ = "0.1.0"
