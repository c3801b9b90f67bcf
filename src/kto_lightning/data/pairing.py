"""KL pairing: every example gets a partner, an unrelated example whose completion it borrows.

The KL row of example i is (prompt of i, completion of its partner), the completion cut to fit
beside that prompt by the same rule as any completion (`fit_beside`). The pairing is drawn once,
seeded, and stored with the data, so it holds for any sampler, batch size or number of ranks.

It works on whole columns (numpy over the flat token ids of all rows), not row by row: preparing
200k rows spent most of its time in a per-row loop before. Whole sequences are compared through a
64-bit hash of each row. Two different hashes mean two different sequences, exactly; two equal
hashes are taken to mean equal sequences, so a hash collision (~2^-64 per comparison) can only
make a candidate partner be refused, never a row's own completion be accepted. Where a cut is
involved (a completion longer than the room beside a prompt) the tokens themselves are compared.
Memory stays near the token ids themselves: the prompts are hashed a chunk of rows at a time.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from kto_lightning.data.tokenize import Example, fit_beside
from kto_lightning.errors import DataError

# Bump when the choice of partners changes, so cached pairings made by older code are not reused.
PAIRING_VERSION = 2
# Rounds of random draws (one per still unpaired example) before an example's eligible KL
# partners are listed explicitly.
_DRAWS = 64


@dataclass(frozen=True)
class TokenIds:
    """Ragged token ids of many rows: row i is `values[offsets[i]:offsets[i + 1]]`."""

    values: np.ndarray  # (total tokens,) int32 (as the tokenized data stores them) or int64
    offsets: np.ndarray  # (rows + 1,) int64, offsets[0] == 0

    @classmethod
    def from_lists(cls, rows: Sequence[Sequence[int]]) -> TokenIds:
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        values = np.fromiter((t for r in rows for t in r), dtype=np.int64, count=int(offsets[-1]))
        return cls(values, offsets)

    @classmethod
    def from_arrow(cls, column: pa.ChunkedArray | pa.Array) -> TokenIds:
        """From a list<int> column (a datasets table's), without a Python object per token."""
        array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        offsets = np.asarray(array.offsets, dtype=np.int64)
        values = array.flatten().to_numpy()  # flatten honours a slice's offset; no copy
        return cls(values, offsets - offsets[0])

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def take(self, rows: np.ndarray) -> TokenIds:
        """The rows at `rows` (indices), in that order."""
        lengths = self.lengths[rows]
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return TokenIds(self.values[_gather(self.offsets[:-1][rows], lengths)], offsets)


@dataclass(frozen=True)
class RowDigest:
    """Of each row, what the pairing reads first: its length and a hash of its tokens.

    The tokens themselves are fetched from `tokens` (the whole column, or the ids of every row)
    only for the few rows the hashes cannot settle: rows cut to the same length.
    """

    lengths: np.ndarray  # (rows,) int64
    hashes: np.ndarray  # (rows,) uint64
    tokens: pa.ChunkedArray | TokenIds
    rows: np.ndarray | None = None  # row k is row rows[k] of `tokens`; None: the same row

    @classmethod
    def of(cls, ids: TokenIds) -> RowDigest:
        return cls(ids.lengths, _row_hashes(ids), ids)

    @classmethod
    def of_arrow(cls, column: pa.ChunkedArray | pa.Array) -> RowDigest:
        """From a list<int> column, a chunk at a time: never the whole column's ids at once."""
        if isinstance(column, pa.Array):
            column = pa.chunked_array([column])
        digests = [cls.of(TokenIds.from_arrow(chunk)) for chunk in column.chunks]
        lengths = [d.lengths for d in digests] or [np.zeros(0, dtype=np.int64)]
        hashes = [d.hashes for d in digests] or [np.zeros(0, dtype=np.uint64)]
        return cls(np.concatenate(lengths), np.concatenate(hashes), column)

    def take(self, rows: np.ndarray) -> RowDigest:
        source_rows = rows if self.rows is None else self.rows[rows]
        return RowDigest(self.lengths[rows], self.hashes[rows], self.tokens, source_rows)

    def ids(self, rows: np.ndarray) -> TokenIds:
        """The tokens of the rows at `rows`, in that order."""
        source_rows = rows if self.rows is None else self.rows[rows]
        if isinstance(self.tokens, TokenIds):
            return self.tokens.take(source_rows)
        return TokenIds.from_arrow(self.tokens.take(pa.array(source_rows)))


def _positions(offsets: np.ndarray) -> np.ndarray:
    """Each token's position within its row, for rows laid end to end at `offsets`."""
    lengths = np.diff(offsets)
    return np.arange(offsets[-1] - offsets[0], dtype=np.int64) - np.repeat(
        offsets[:-1] - offsets[0], lengths
    )


def _gather(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Flat positions of `lengths[k]` tokens from `starts[k]`, for every k in turn."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return np.repeat(starts, lengths) + _positions(offsets)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a well spread uint64 per input (wrapping arithmetic)."""
    z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


# Rows hashed per numpy pass: bounds the temporary arrays (a few times 8 bytes per token).
_HASH_CHUNK_ROWS = 16_384


def _row_hashes(ids: TokenIds) -> np.ndarray:
    """A uint64 hash of each row's whole token sequence (position-aware)."""
    n = len(ids.offsets) - 1
    hashes = np.zeros(n, dtype=np.uint64)
    for first in range(0, n, _HASH_CHUNK_ROWS):
        last = min(first + _HASH_CHUNK_ROWS, n)
        bounds = ids.offsets[first : last + 1] - ids.offsets[first]
        values = ids.values[ids.offsets[first] : ids.offsets[last]]
        sums = np.zeros(len(values) + 1, dtype=np.uint64)
        np.cumsum(_mix(values.astype(np.uint64) ^ _mix(_positions(bounds))), out=sums[1:])
        hashes[first:last] = sums[bounds[1:]] - sums[bounds[:-1]]
    return hashes


def _prefixes_differ(
    rows: RowDigest, i: np.ndarray, j: np.ndarray, length: np.ndarray
) -> np.ndarray:
    """Whether the first `length[k]` tokens of rows i[k] and j[k] differ (exact)."""
    differ = np.zeros(len(i), dtype=bool)
    nonempty = np.flatnonzero(length > 0)  # two empty prefixes are equal
    if not nonempty.size:
        return differ
    length = length[nonempty]
    firsts, seconds = rows.ids(i[nonempty]), rows.ids(j[nonempty])
    unequal = (
        firsts.values[_gather(firsts.offsets[:-1], length)]
        != seconds.values[_gather(seconds.offsets[:-1], length)]
    )
    starts = np.zeros(len(length), dtype=np.int64)
    np.cumsum(length[:-1], out=starts[1:])
    differ[nonempty] = np.logical_or.reduceat(unequal, starts)
    return differ


def kl_partners_of(
    prompts: RowDigest | TokenIds, completions: RowDigest | TokenIds, max_length: int, seed: int
) -> np.ndarray:
    """For every row, the index of another whose completion is unrelated to it.

    The partner's completion, cut to fit beside the row's prompt, must differ from the row's own
    completion (cut the same way), and its prompt should differ too (paired data holds two rows
    per prompt; a reply to the same prompt is not an unrelated completion). Drawn at random,
    seeded; where every different completion shares the prompt, a different completion is
    enough.
    """
    if isinstance(prompts, TokenIds):
        prompts = RowDigest.of(prompts)
    if isinstance(completions, TokenIds):
        completions = RowDigest.of(completions)
    n = len(completions.lengths)
    if n < 2:
        raise DataError(
            f"the KL estimate needs at least 2 examples with different completions; got {n}"
        )
    prompt_lengths, prompt_hash = prompts.lengths, prompts.hashes
    lengths, own_hash_full = completions.lengths, completions.hashes
    if _all_equal(completions):
        raise DataError(
            "every example has the same completion, so no example can be paired with an "
            "unrelated completion for the KL estimate"
        )
    room = np.maximum(max_length - prompt_lengths, 0)
    own_length = np.minimum(lengths, room)

    def unrelated(i: np.ndarray, j: np.ndarray, strict: bool) -> np.ndarray:
        cut = np.minimum(lengths[j], room[i])
        differs = cut != own_length[i]
        # Equal lengths: both completions whole -> their hashes; a cut involved -> the tokens.
        whole = ~differs & (cut == lengths[j]) & (own_length[i] == lengths[i])
        differs[whole] = own_hash_full[j[whole]] != own_hash_full[i[whole]]
        cut_rows = np.flatnonzero(~differs & ~whole)
        differs[cut_rows] = _prefixes_differ(completions, i[cut_rows], j[cut_rows], cut[cut_rows])
        if strict:
            other_prompt = prompt_lengths[j] != prompt_lengths[i]
            differs &= other_prompt | (prompt_hash[j] != prompt_hash[i])
        return differs

    rng = np.random.default_rng(seed)
    partners = np.full(n, -1, dtype=np.int64)
    todo = np.arange(n, dtype=np.int64)
    for _ in range(_DRAWS):  # rejection sampling, all unpaired rows at once
        if not todo.size:
            break
        draws = rng.integers(0, n, size=todo.size)
        ok = unrelated(todo, draws, strict=True)
        partners[todo[ok]] = draws[ok]
        todo = todo[~ok]
    everyone = np.arange(n, dtype=np.int64)
    for i in todo.tolist():  # left only where most rows are alike
        row = np.full(n, i, dtype=np.int64)
        eligible = np.flatnonzero(unrelated(row, everyone, strict=True))
        if not eligible.size:
            eligible = np.flatnonzero(unrelated(row, everyone, strict=False))
        if not eligible.size:
            raise DataError(
                f"example {i}: every completion cut to the {int(room[i])} token(s) left beside "
                "its prompt equals its own, so it has no unrelated completion for the KL "
                "estimate; raise data.lengths.max_length or lower data.lengths.max_prompt_length"
            )
        partners[i] = eligible[rng.integers(0, eligible.size)]
    return partners


def cached_kl_partners(
    prompts: RowDigest | TokenIds,
    completions: RowDigest | TokenIds,
    keep: np.ndarray,
    max_length: int,
    seed: int,
    key: tuple,
    folder: Path | None,
) -> np.ndarray:
    """`kl_partners_of` the rows at `keep`, read from or written to `folder`.

    `key` must name everything the rows at `keep` depend on (the tokenized dataset's fingerprint,
    the filters applied); the seed, `max_length` and `PAIRING_VERSION` are added here. Without a
    folder (rows made in memory) nothing is cached.
    """
    digest = hashlib.sha256(repr((*key, max_length, seed, PAIRING_VERSION)).encode()).hexdigest()
    path = folder / f"kl-partners-{digest[:32]}.npy" if folder is not None else None
    if path is not None and path.is_file():
        partners = np.load(path)
        if len(partners) == len(keep):
            return partners
    if len(keep) != len(completions.lengths):
        prompts, completions = prompts.take(keep), completions.take(keep)
    partners = kl_partners_of(prompts, completions, max_length, seed)
    if path is not None:
        # Written whole, then renamed: a run stopped midway leaves no truncated file behind.
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
        np.save(tmp, partners)
        os.replace(tmp, path)
    return partners


def _all_equal(rows: RowDigest) -> bool:
    """Whether every row holds the same tokens (exact: hashes only rule it out)."""
    lengths, hashes = rows.lengths, rows.hashes
    if (lengths != lengths[0]).any() or (hashes != hashes[0]).any():
        return False
    if lengths[0] == 0:
        return True
    values = rows.ids(np.arange(len(lengths))).values
    return bool((values.reshape(len(lengths), -1) == values[: lengths[0]]).all())


def kl_partners(
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    max_length: int,
    seed: int,
) -> list[int]:
    """`kl_partners_of` for token ids held as Python lists."""
    return kl_partners_of(
        TokenIds.from_lists(prompts), TokenIds.from_lists(completions), max_length, seed
    ).tolist()


def assign_kl_partners(examples: Sequence[Example], max_length: int, seed: int) -> list[Example]:
    """Examples with `kl_completion_ids` filled from `kl_partners`, cut to fit their prompt."""
    partners = kl_partners(
        [e.prompt_ids for e in examples], [e.completion_ids for e in examples], max_length, seed
    )
    return [
        Example(
            e.prompt_ids,
            e.completion_ids,
            e.label,
            fit_beside(len(e.prompt_ids), examples[j].completion_ids, max_length),
        )
        for e, j in zip(examples, partners, strict=True)
    ]
