"""The training data path: sampler, packed batches, panel views (the reader: concept.store)."""

from concept.data.batch import PackedBatch
from concept.data.loader import TokenLoader
from concept.data.sampler import BlockSampler

__all__ = ["BlockSampler", "PackedBatch", "TokenLoader"]
