"""Binary-feedback data: reading rows, tokenization, KL pairing, collation, the data module."""

from kto_lightning.data.collate import KTOCollator
from kto_lightning.data.datamodule import KTODataModule
from kto_lightning.data.rows import Row, parse_label
from kto_lightning.data.tokenize import Example, assign_kl_partners, tokenize_rows
from kto_lightning.data.toy import toy_rows

__all__ = [
    "Example",
    "KTOCollator",
    "KTODataModule",
    "Row",
    "assign_kl_partners",
    "parse_label",
    "tokenize_rows",
    "toy_rows",
]
