"""Domain data: records, splits, formatting and batching."""

from loralab.data.datamodule import (
    DomainDataModule,
    data_file_hashes,
    domain_file,
    load_domain_split,
)
from loralab.data.formatting import IGNORE_INDEX, EncodedExample, encode_pair, prompt_text
from loralab.data.records import (
    DOMAINS,
    ROUTER_LABELS,
    DataFormatError,
    Record,
    read_records,
    select_split,
    split_of,
)

__all__ = [
    "DOMAINS",
    "IGNORE_INDEX",
    "ROUTER_LABELS",
    "DataFormatError",
    "DomainDataModule",
    "EncodedExample",
    "Record",
    "data_file_hashes",
    "domain_file",
    "encode_pair",
    "load_domain_split",
    "prompt_text",
    "read_records",
    "select_split",
    "split_of",
]
