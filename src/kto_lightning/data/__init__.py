"""Binary-feedback data: reading rows, tokenization, KL pairing, collation, the data module."""

from kto_lightning.data.collate import KTOCollator
from kto_lightning.data.config import Batching, Columns, Lengths, Source
from kto_lightning.data.datamodule import KTODataModule
from kto_lightning.data.pairing import assign_kl_partners, kl_partners
from kto_lightning.data.rows import Row, parse_label
from kto_lightning.data.tokenize import Example, fit_beside, tokenize_rows
from kto_lightning.data.toy import toy_rows

__all__ = [
    "Batching",
    "Columns",
    "Example",
    "KTOCollator",
    "KTODataModule",
    "Lengths",
    "Row",
    "Source",
    "assign_kl_partners",
    "fit_beside",
    "kl_partners",
    "parse_label",
    "tokenize_rows",
    "toy_rows",
]
