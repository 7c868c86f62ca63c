"""Domain data: records, splits and the per-config split loader (``records``), formatting (``formatting``), batching
(``batching``), the Lightning DataModule (``datamodule``) and two-domain requests (``mixtures``).

Names are imported lazily so that reading records does not import Lightning.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "BASE_LABEL": "records",
    "router_labels": "records",
    "DataFormatError": "records",
    "Record": "records",
    "read_records": "records",
    "select_split": "records",
    "split_of": "records",
    "IGNORE_INDEX": "formatting",
    "EncodedExample": "formatting",
    "encode_pair": "formatting",
    "prompt_text": "formatting",
    "data_file_hashes": "records",
    "domain_file": "records",
    "load_domain_split": "records",
    "DomainDataModule": "datamodule",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f"loralab.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'loralab.data' has no attribute {name!r}")
