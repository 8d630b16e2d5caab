"""Training: one loop, and a stage per kind of training (pretraining so far)."""

from lmforge.train.config import TrainConfig
from lmforge.train.loop import TrainingDiverged, TrainResult, fit
from lmforge.train.pretrain import PretrainStage

__all__ = ["PretrainStage", "TrainConfig", "TrainResult", "TrainingDiverged", "fit"]
