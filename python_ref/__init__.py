"""Pure-PyTorch ground truth: every architecture of the design document and a reference for every op.

``ARCHITECTURES`` maps each name to its builder; ``build(name, size)`` makes the model and
``example_inputs(name)`` a batch that ``model(**inputs)`` accepts.
"""

from .registry import ARCHITECTURES, build, example_inputs  # noqa: F401
from . import ops  # noqa: F401
from . import fusion, training  # noqa: F401  (fusion-point modules; training strategies and recipes)

__all__ = ["ARCHITECTURES", "build", "example_inputs", "ops", "fusion", "training"]
