"""pretrain: distributed GPT pretraining (tensor, pipeline, data parallelism and ZeRO)."""

__version__ = "0.1.0"
