"""What the data came to: rows read, kept and dropped, label counts and token lengths."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

PERCENTILES = (50, 90, 99, 100)


def percentiles(lengths: Sequence[int]) -> list[int]:
    """The 50th, 90th, 99th and 100th percentiles (nearest rank) of token lengths."""
    if not lengths:
        return [0 for _ in PERCENTILES]
    ordered = torch.tensor(sorted(lengths), dtype=torch.float64)
    return [
        int(torch.quantile(ordered, q / 100, interpolation="higher").item()) for q in PERCENTILES
    ]


@dataclass
class SplitSummary:
    """One split (train or validation) after reading, normalising and tokenizing."""

    name: str
    source: str
    format: str
    conversational: bool
    rows_read: int
    desirable: int = 0
    undesirable: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    prompts_truncated: int = 0
    completions_truncated: int = 0
    prompt_lengths: list[int] = field(default_factory=lambda: [0] * len(PERCENTILES))
    completion_lengths: list[int] = field(default_factory=lambda: [0] * len(PERCENTILES))
    tokenization: str = "computed"

    @property
    def kept(self) -> int:
        return self.desirable + self.undesirable


def format_summary(splits: Sequence[SplitSummary], max_length: int, max_prompt_length: int) -> str:
    """A small table, one column per split, printed before training starts."""
    names = [s.name for s in splits]

    def lengths(values: list[int]) -> str:
        return "/".join(str(v) for v in values)

    rows: list[tuple[str, list[str]]] = [
        ("source", [s.source for s in splits]),
        (
            "format",
            [s.format + (", conversational" if s.conversational else "") for s in splits],
        ),
        ("rows read", [str(s.rows_read) for s in splits]),
        ("rows kept", [str(s.kept) for s in splits]),
    ]
    reasons = sorted({r for s in splits for r in s.dropped})
    rows += [(f"dropped: {r}", [str(s.dropped.get(r, 0)) for s in splits]) for r in reasons]
    rows += [
        ("desirable", [str(s.desirable) for s in splits]),
        ("undesirable", [str(s.undesirable) for s in splits]),
        ("prompt tokens p50/p90/p99/max", [lengths(s.prompt_lengths) for s in splits]),
        ("completion tokens p50/p90/p99/max", [lengths(s.completion_lengths) for s in splits]),
        (f"prompts cut to {max_prompt_length}", [str(s.prompts_truncated) for s in splits]),
        (f"completions cut (max {max_length})", [str(s.completions_truncated) for s in splits]),
        ("tokenization", [s.tokenization for s in splits]),
    ]
    label_width = max(len(label) for label, _ in rows)
    widths = [max(len(n), *(len(v[i]) for _, v in rows)) for i, n in enumerate(names)]
    header = (
        " " * label_width + "  " + "  ".join(n.rjust(w) for n, w in zip(names, widths, strict=True))
    )
    lines = ["data summary", header]
    for label, values in rows:
        cells = "  ".join(v.rjust(w) for v, w in zip(values, widths, strict=True))
        lines.append(f"{label.ljust(label_width)}  {cells}")
    return "\n".join(lines)
