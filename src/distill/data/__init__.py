"""Data: documents from the default corpus or local files, packed into token blocks."""

from distill.data.blocks import BlockBatches, batch_order, pack_documents
from distill.data.corpus import default_documents, read_documents, split_documents

__all__ = [
    "BlockBatches",
    "batch_order",
    "pack_documents",
    "default_documents",
    "read_documents",
    "split_documents",
]
