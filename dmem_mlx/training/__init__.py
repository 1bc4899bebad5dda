"""δ-mem adapter training in MLX: data (chat JSONL → write/read segments) and the trainer."""

from .data import Batch, ChatEncoder, DataError, Example, collate, load_split, make_example
from .trainer import TrainOptions, batch_loss, evaluate, freeze_backbone, train

__all__ = ["Batch", "ChatEncoder", "DataError", "Example", "TrainOptions", "batch_loss",
           "collate", "evaluate", "freeze_backbone", "load_split", "make_example", "train"]
