"""Data: documents from the default corpus or local files, packed into token blocks; chat and
prompt/response examples with their own targets."""

from distill.data.blocks import BlockBatches, RoutedBlocks, batch_order, pack_documents
from distill.data.check import check_data_source
from distill.data.corpus import default_documents, read_documents, split_documents
from distill.data.examples import Batch, ExampleBatches, Examples
from distill.data.routing import Routing

__all__ = [
    "Batch",
    "ExampleBatches",
    "Examples",
    "BlockBatches",
    "RoutedBlocks",
    "Routing",
    "batch_order",
    "check_data_source",
    "pack_documents",
    "default_documents",
    "read_documents",
    "split_documents",
]
