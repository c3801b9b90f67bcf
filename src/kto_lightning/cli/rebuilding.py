"""The one seeding rule before a run's model is rebuilt outside training.

A random-init model (model=tiny) is the run's model only under the run's seed, and a LoRA
policy's frozen base too: `run_build.build` seeds with `L.seed_everything(cfg.seed)` before
it builds the policy, so evaluate, generate and export seed the same way before they rebuild it.
"""

from __future__ import annotations

import lightning as L

from kto_lightning.core.logprobs import CausalLM
from kto_lightning.models import ModelSource


def seeded_policy(source: ModelSource, seed: int | None) -> CausalLM:
    """`source`'s model, built under the run's `seed` (None or 0 in an old config: 0)."""
    L.seed_everything(int(seed or 0), verbose=False)
    return source.load_policy()
