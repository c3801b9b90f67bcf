"""benchmarks/gpu.py's plan and report, without running a child: the FSDP2 and varlen rows, the
line saying no variable-length kernel is installed, and how packed rows were kept apart, counted
on a real packed forward (sdpa) and on transformers' flash-attention check."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import transformers.utils
from transformers import masking_utils
from transformers import modeling_flash_attention_utils as flash_utils

from kto_lightning.core import logprobs
from kto_lightning.core.logprobs import batch_logprobs
from kto_lightning.core.packing import Packing
from kto_lightning.data.collate import KTOCollator
from kto_lightning.data.tokenize import Example
from kto_lightning.models import TinyLlama

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import gpu
import runners


@pytest.fixture
def counts(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """runners._watch_packing's counters; the functions it wraps are put back afterwards."""
    monkeypatch.setattr(logprobs, "pack_rows", logprobs.pack_rows)
    monkeypatch.setattr(
        masking_utils, "find_packed_sequence_indices", masking_utils.find_packed_sequence_indices
    )
    monkeypatch.setattr(flash_utils, "_is_packed_sequence", flash_utils._is_packed_sequence)
    return runners._watch_packing()


def _row(key: str, result: dict) -> gpu.Row:
    return gpu.Row(key, key, runners.ChildSpec("ours", "live", "", "", "", 8, 4, 1), 0, result)


def test_a_packed_sdpa_forward_is_counted_as_kept_apart_by_the_block_mask(counts) -> None:
    torch.manual_seed(0)
    model = TinyLlama(hidden_size=32, num_layers=1).load_policy().eval()
    examples = [Example([1] * n, [2] * n, n % 2 == 0, [3] * n, n) for n in (3, 5, 9)]
    batch = KTOCollator(258, needs_kl_rows=True)(examples)
    with torch.no_grad():
        batch_logprobs(model, batch, 7, True, Packing(64))  # all 3 rows fit one pack of 64
    assert counts == dict(forwards=2, rows=6, packs=2, mask_packed=2, varlen_calls=0, plain_calls=0)
    text = gpu.isolation(_row("packing/ours", {"packing": counts, "attn_implementation": "sdpa"}))
    assert text.startswith("by the block mask: sdpa") and "6 rows in 2 packs" in text


def test_flash_attention_over_packs_of_several_rows_is_reported_not_isolated(counts) -> None:
    # transformers' flash path reads row bounds from the position ids of one sequence only: two
    # packs of two rows each run its plain causal kernel, the same rows laid end to end its
    # variable-length kernel.
    positions = torch.tensor([[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]])
    assert not flash_utils._is_packed_sequence(positions, 2)
    assert flash_utils._is_packed_sequence(positions.view(1, -1), 1)
    assert (counts["plain_calls"], counts["varlen_calls"]) == (1, 1)
    held = dict(forwards=1, rows=4, packs=2, mask_packed=1)
    flash = {"attn_implementation": "flash_attention_2"}
    plain = _row(
        "varlen/ours", {**flash, "packing": {**held, "varlen_calls": 0, "plain_calls": 22}}
    )
    assert gpu.isolation(plain).startswith("NOT ISOLATED: flash_attention_2 ran its plain causal")
    varlen = _row(
        "varlen/ours", {**flash, "packing": {**held, "varlen_calls": 22, "plain_calls": 0}}
    )
    assert gpu.isolation(varlen).startswith("by the kernel: flash_attention_2's variable-length")
    alone = {**held, "rows": 2, "varlen_calls": 0, "plain_calls": 22}  # one row per pack
    assert gpu.isolation(_row("varlen/ours", {**flash, "packing": alone})).startswith("one row per")


def _plan(tmp_path: Path, varlen: str | None) -> gpu.Plan:
    varlen, note = gpu.varlen_attention(varlen)
    return gpu.Plan(
        mode=gpu.SMOKE, warmup=2, steps=1, only=set(gpu.ROW_GROUPS), skip_trl=True,
        ours_overrides=(), compile_overrides=(), peak_tflops=1.0, budget_s=None, timeout=60,
        jobs=1, threads=None, command="python benchmarks/gpu.py --smoke",
        fixture_dir=tmp_path, out=tmp_path / "smoke.md", log_dir=tmp_path, varlen=varlen,
        varlen_note=note,
    )  # fmt: skip


def test_the_first_installed_varlen_kernel_is_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    for check in gpu.VARLEN_KERNELS.values():
        monkeypatch.setattr(transformers.utils, check, lambda: False)
    assert gpu.varlen_attention(None)[0] is None
    assert "variable-length attention: none installed" in gpu.varlen_attention(None)[1]
    monkeypatch.setattr(transformers.utils, "is_flash_attn_3_available", lambda: True)
    assert gpu.varlen_attention(None)[0] == "flash_attention_3"
    assert gpu.varlen_attention("flex_attention")[0] == "flex_attention"
    assert gpu.varlen_attention("none")[0] is None


def test_the_plan_has_an_fsdp_row_and_a_varlen_row_only_with_a_kernel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for check in gpu.VARLEN_KERNELS.values():  # as on a machine without any
        monkeypatch.setattr(transformers.utils, check, lambda: False)
    plan = _plan(tmp_path, None)
    rows = {row.key: row for row in gpu.plan_rows(plan, tmp_path, tmp_path)}
    assert list(rows) == [
        "live8/ours", "cache/fill", "cache/ours", "fsdp/ours", "packing/ours", "live16/ours",
        "compile/ours",
    ]  # fmt: skip
    assert rows["fsdp/ours"].spec.ours_overrides[-2:] == ("strategy=fsdp", "trainer.devices=1")
    assert rows["packing/ours"].spec.watch_packing and not rows["live8/ours"].spec.watch_packing
    facts = dict(
        rows=8, desirable=4, mean_prompt_tokens=5, mean_completion_tokens=5, max_row_tokens=12,
        tokenizer_vocab=300,
    )  # fmt: skip
    versions = dict.fromkeys(("python", "torch", "transformers", "lightning", "trl", "datasets"))
    header = {"date": "today", "versions": versions, "kto_lightning": "0", "commit": None}
    report = gpu.report(plan, list(rows.values()), header, facts)
    assert "variable-length attention: none installed" in report
    assert "| ours, strategy=fsdp trainer.devices=1, batch 8 | n/a |" in report  # not run yet
    kernel = _plan(tmp_path, "flash_attention_2")
    packing = [r for r in gpu.plan_rows(kernel, tmp_path, tmp_path) if r.spec.watch_packing]
    assert [r.key for r in packing] == ["packing/ours", "varlen/ours"]
    varlen_spec = packing[1].spec
    assert varlen_spec.ours_overrides == (
        *packing[0].spec.ours_overrides,
        "model.attn_implementation=flash_attention_2",
    )
    assert varlen_spec.watch_packing and replace(varlen_spec, ours_overrides=()) == replace(
        packing[0].spec, ours_overrides=()
    )
