"""Which tokenized rows a split keeps, and what it says of them: rows without completion tokens
dropped (and the undesirable ones for SFT), KL partners paired, the split's summary counted, and
the checks on the kept rows (enough to train, both labels, prompts cut).
"""

from __future__ import annotations

import logging
from pathlib import Path

import datasets
import numpy as np

from kto_lightning.data.config import Batching, Lengths
from kto_lightning.data.dataset import KTODataset
from kto_lightning.data.pairing import RowDigest, cached_kl_partners
from kto_lightning.data.rows import arrow_column
from kto_lightning.data.splits import ReadSplit
from kto_lightning.data.summary import SplitSummary, percentiles
from kto_lightning.errors import DataError

log = logging.getLogger(__name__)

DROPPED_EMPTY = "no completion tokens left"
DROPPED_UNDESIRABLE = "undesirable (loss=sft)"


def _cache_folder(rows: datasets.Dataset) -> Path | None:
    """The folder of a dataset's cache files; None for rows made in memory (nothing to reuse)."""
    return Path(rows.cache_files[0]["filename"]).parent if rows.cache_files else None


def keep_and_pair(
    read: ReadSplit,
    tokenized: datasets.Dataset,
    note: str,
    seed: int,
    lengths: Lengths,
    drop_undesirable: bool,
    needs_kl_rows: bool,
) -> tuple[KTODataset, SplitSummary]:
    """Filter and pair one tokenized split; `seed` seeds its KL pairing.

    Rows left with no completion tokens are dropped, and the undesirable ones when
    `drop_undesirable` (SFT); the summary counts both. With `needs_kl_rows`, each kept row gets
    a KL partner (pairing.py), cached beside the tokenized rows.
    """
    chat, name = read.conversational, read.name
    max_length, max_prompt_length = lengths.max_length, lengths.max_prompt_length
    # Whole columns through Arrow and numpy: no Python object per token (see pairing.py).
    prompt_tokens = arrow_column(tokenized, "prompt_tokens").to_numpy()
    completion_tokens = arrow_column(tokenized, "completion_tokens").to_numpy()
    completions = RowDigest.of_arrow(arrow_column(tokenized, "completion_ids"))
    kept_completions = completions.lengths
    all_labels = arrow_column(tokenized, "label").to_numpy().astype(bool)
    keep = np.flatnonzero(kept_completions > 0)
    empty = len(tokenized) - len(keep)
    undesirable = int((~all_labels[keep]).sum())
    if drop_undesirable and undesirable:
        keep = keep[all_labels[keep]]
    kept_rows = tokenized if len(keep) == len(tokenized) else tokenized.select(keep)
    labels = all_labels[keep].tolist()
    summary = SplitSummary(
        name=read.split,
        source=name,
        format=read.format,
        conversational=chat,
        rows_read=read.rows_read,
        desirable=sum(labels),
        undesirable=len(labels) - sum(labels),
        prompts_truncated=int((prompt_tokens > max_prompt_length).sum()),
        completions_truncated=int((kept_completions < completion_tokens).sum()),
        prompt_lengths=percentiles(prompt_tokens.tolist()),
        completion_lengths=percentiles(completion_tokens.tolist()),
        tokenization=note,
    )
    summary.dropped.update(read.dropped)  # dropped while read (chosen == rejected)
    if empty:
        summary.dropped[DROPPED_EMPTY] = empty
    if drop_undesirable and undesirable:
        summary.dropped[DROPPED_UNDESIRABLE] = undesirable
    partners = None
    if needs_kl_rows:
        if len(keep) < 2:
            raise DataError(f"{name}: the KL estimate needs at least 2 rows, got {len(keep)}")
        key = (tokenized._fingerprint, drop_undesirable, max_length, seed)
        try:
            partners = cached_kl_partners(
                RowDigest.of_arrow(arrow_column(tokenized, "prompt_ids")),
                completions,
                keep,
                max_length,
                seed,
                key,
                _cache_folder(tokenized),
            )
        except DataError as error:
            raise DataError(f"{name}: {error}") from None
    return KTODataset(kept_rows, partners, max_length), summary


def check_splits(
    train: SplitSummary,
    val: SplitSummary,
    batching: Batching,
    lengths: Lengths,
    drop_undesirable: bool,
) -> None:
    """DataError when the kept rows cannot train (no desirable rows for SFT, fewer training rows
    than a batch); a warning for a split of one label or with prompts cut."""
    for summary in (train, val) if drop_undesirable else ():
        if summary.desirable == 0:
            raise DataError(
                f"{summary.source}: no desirable rows in the {summary.name} set, and this run "
                "trains on the desirable rows alone (loss=sft); for data without labels set "
                "data.columns.label=null (every row is then desirable)"
            )
    batch_size = batching.batch_size
    if train.kept < batch_size:
        raise DataError(
            f"{train.source}: {train.kept} training rows are fewer than one batch "
            f"(data.batching.batch_size={batch_size}); lower data.batching.batch_size or add "
            "rows"
        )
    for summary in (train, val):
        one_label = summary.desirable == 0 or summary.undesirable == 0
        if one_label and not drop_undesirable:  # SFT has no undesirable rows on purpose
            missing = "desirable" if summary.desirable == 0 else "undesirable"
            log.warning(
                "%s set has no %s rows: KTO still trains, but only pushes one way, and the "
                "reward AUROC is undefined (logged as NaN)",
                summary.name, missing,
            )  # fmt: skip
        if summary.prompts_truncated:
            log.warning(
                "%s set: %d prompt(s) longer than data.lengths.max_prompt_length=%d were cut "
                "from the left (their start is lost)",
                summary.name, summary.prompts_truncated, lengths.max_prompt_length,
            )  # fmt: skip
