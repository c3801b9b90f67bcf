"""Compiled code run eagerly for a block: generation and one-off passes (see `eager`)."""

from __future__ import annotations

import contextlib

import torch


def eager() -> contextlib.AbstractContextManager:
    """Run compiled layers eagerly inside the block (torch >= 2.6; older torch compiles).

    For generation, and for one-off passes such as filling the reference cache. With a KV cache,
    each layer reads its own slot of the cache by its layer index, which torch treats as a
    constant: every layer needs entries of its own (12 layers generating from two prompts made
    48). They would fill the layers' shared list of entries (`RECOMPILE_LIMIT`), after which
    every way of calling the layers not compiled yet, the training step after a first
    validation among them, runs eagerly. A handful of greedy tokens gains nothing from
    compiling anyway.
    """
    if hasattr(torch.compiler, "set_stance"):
        return torch.compiler.set_stance("force_eager")
    return contextlib.nullcontext()
