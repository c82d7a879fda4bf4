"""Model zoo: architectures, their committed weights, and the training script (``python -m cwhawq.zoo.train``)."""
from .nets import ZOO, build, weights_path  # noqa: F401
