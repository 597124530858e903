"""snac-accel: train SNAC codecs with HuggingFace Accelerate."""

from .config import TrainConfig

__version__ = "0.1.0"
__all__ = ["TrainConfig", "SnacTrainer", "train", "__version__"]


def __getattr__(name: str):
    # The trainer pulls in torch, datasets and accelerate: import it only when asked for.
    if name in ("SnacTrainer", "train"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(name)
