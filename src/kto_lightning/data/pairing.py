"""KL pairing: every example gets a partner, an unrelated example whose completion it borrows.

The KL row of example i is (prompt of i, completion of its partner), the completion cut to fit
beside that prompt by the same rule as any completion (`fit_beside`). The pairing is drawn once,
seeded, and stored with the data, so it holds for any sampler, batch size or number of ranks.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from kto_lightning.data.tokenize import Example, fit_beside
from kto_lightning.errors import DataError

# Random draws per example before the eligible KL partners are listed explicitly.
_DRAWS = 64


def kl_partners(
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    max_length: int,
    seed: int,
) -> list[int]:
    """For every example, the index of another whose completion is unrelated to it.

    The partner's completion, cut to fit beside the example's prompt, must differ from the
    example's own completion, and its prompt should differ too (paired data holds two rows per
    prompt; a reply to the same prompt is not an unrelated completion). Drawn at random, seeded;
    where every different completion shares the prompt, a different completion is enough.
    """
    n = len(completions)
    if n < 2:
        raise DataError(
            f"the KL estimate needs at least 2 examples with different completions; got {n}"
        )
    if len({tuple(c) for c in completions}) < 2:
        raise DataError(
            "every example has the same completion, so no example can be paired with an "
            "unrelated completion for the KL estimate"
        )
    rng = random.Random(seed)
    partners = []
    for i in range(n):
        prompt_length = len(prompts[i])
        own = fit_beside(prompt_length, completions[i], max_length)

        def unrelated(
            j: int, strict: bool, i: int = i, prompt_length: int = prompt_length, own: list = own
        ) -> bool:
            if fit_beside(prompt_length, completions[j], max_length) == own:
                return False
            return not strict or list(prompts[j]) != list(prompts[i])

        partner = None
        for _ in range(_DRAWS):  # rejection sampling: quick unless most rows are alike
            j = rng.randrange(n)
            if unrelated(j, strict=True):
                partner = j
                break
        if partner is None:
            eligible = [j for j in range(n) if unrelated(j, strict=True)]
            eligible = eligible or [j for j in range(n) if unrelated(j, strict=False)]
            if not eligible:
                raise DataError(
                    f"example {i}: every completion cut to the {max_length - prompt_length} "
                    "token(s) left beside its prompt equals its own, so it has no unrelated "
                    "completion for the KL estimate; raise data.lengths.max_length or lower "
                    "data.lengths.max_prompt_length"
                )
            partner = rng.choice(eligible)
        partners.append(partner)
    return partners


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
