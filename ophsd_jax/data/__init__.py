"""Tasks (prompt + reward), loaders for user files, dataset builders, iterators.

`builders` (tensorflow-datasets) is imported on demand:
`from ophsd_jax.data.builders import build_dataset`.
"""

from ophsd_jax.data.errors import DataError, LoadReport
from ophsd_jax.data.iterator import ExampleIterator
from ophsd_jax.data.sources import load_source, split_examples
from ophsd_jax.data.tasks import AccusationTask, MathTask, ReactionClassTask, make_task

__all__ = [
    "AccusationTask",
    "DataError",
    "ExampleIterator",
    "LoadReport",
    "MathTask",
    "ReactionClassTask",
    "load_source",
    "make_task",
    "split_examples",
]
