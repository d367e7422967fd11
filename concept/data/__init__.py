"""The training data path: sampler, reader, packed batches, panel views."""

from concept.data.batch import PackedBatch
from concept.data.loader import TokenLoader
from concept.data.sampler import BlockSampler

__all__ = ["BlockSampler", "PackedBatch", "TokenLoader"]
