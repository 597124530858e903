"""snac-accel: train SNAC codecs with HuggingFace Accelerate."""

import warnings

# snac scripts its snake activation with torch.jit.script when imported, which torch now deprecates; the
# trainer uses its own eager Snake (`model.Snake`), so the warning says nothing about this package's runs.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)

from .config import TrainConfig  # noqa: E402

__version__ = "0.1.0"
__all__ = ["TrainConfig", "SnacTrainer", "train", "create_training_config", "train_main", "__version__"]


def __getattr__(name: str):
    # The trainer pulls in torch, datasets and accelerate: import it only when asked for.
    if name in ("SnacTrainer", "train", "train_main"):
        from . import trainer

        return getattr(trainer, name)
    if name == "create_training_config":  # the earlier SNAC training scripts' names
        from .arguments import create_training_config

        return create_training_config
    raise AttributeError(name)
