"""Dataset indexes for the real on-disk formats (Mid-level, MAESTRO) and the generated demo dataset.

Nothing is decoded here: an index lists the items (paths, splits, labels) and the items it skipped and why.
"""

from mdlda.datasets.common import DatasetFormatError, DatasetIndex, DatasetSplitError
from mdlda.datasets.demo import generate_demo
from mdlda.datasets.maestro import index_maestro, segment_id
from mdlda.datasets.midlevel import index_midlevel

__all__ = [
    "DatasetFormatError",
    "DatasetIndex",
    "DatasetSplitError",
    "generate_demo",
    "index_maestro",
    "index_midlevel",
    "segment_id",
]
