"""Counter-based Gumbel noise: online KTO's sampler draws with it (online/sampler.py).

Each row of a generation batch has a key (`row_keys`: a prompt's seed and the sample's number);
the noise of a token at a step is a pure function of (key, step, token id), built from
splitmix64 on int64 tensors, so it is the same on every device and for any batch the row is in.
Added to the warped scores, it makes greedy `generate` sample (`GumbelNoise`): the argmax of
scores plus Gumbel(0, 1) noise is a draw from softmax(scores).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from transformers import LogitsProcessor


def _int64(value: int) -> int:
    """`value` modulo 2**64, as the signed int64 with the same bits (a Python int of 2**63 or
    more does not fit in a torch int64)."""
    return (value + 2**63) % 2**64 - 2**63


_GOLDEN = _int64(0x9E3779B97F4A7C15)  # splitmix64's increment
_MIX1 = _int64(0xBF58476D1CE4E5B9)
_MIX2 = _int64(0x94D049BB133111EB)


def mix64(x: Tensor) -> Tensor:
    """splitmix64's finaliser, elementwise on int64: a bijection of 64-bit words whose products
    wrap modulo 2**64, alike on CPU and CUDA."""
    return _mix64_(x.clone())


def _mix64_(x: Tensor) -> Tensor:
    """`mix64` in place: (B, V) words take a few passes over two buffers, not a new one per
    operation (on CPU the fresh allocations cost more than the arithmetic)."""
    shifted = torch.empty_like(x)
    for bits, factor in ((30, _MIX1), (27, _MIX2), (31, None)):
        torch.bitwise_right_shift(x, bits, out=shifted)
        shifted &= (1 << (64 - bits)) - 1  # torch's >> is arithmetic: clear the copied sign
        x ^= shifted
        if factor is not None:
            x *= factor
    return x


def row_keys(seeds: Sequence[int], k: int) -> Tensor:
    """(len(seeds) * k,) int64: the key of sample j of prompt i, mixed from seeds[i] and j, in
    the order the sampler lays rows out (each prompt's k together)."""
    seed = torch.tensor([_int64(s) for s in seeds], dtype=torch.long)
    return mix64(mix64(seed).repeat_interleave(k) + torch.arange(k).repeat(len(seeds)))


def uniforms(keys: Tensor, step: int, vocab: int) -> Tensor:
    """(B,) row keys -> (B, vocab) float64 uniforms in (0, 1), a pure function of (key, step,
    token id): each row's step seeds a splitmix64 stream, whose token-id-th word gives u."""
    stream = mix64(keys + _int64((step + 1) * _GOLDEN))  # (B,)
    token = torch.arange(1, vocab + 1, device=keys.device) * _GOLDEN  # (V,), wraps
    words = _mix64_(stream[:, None] + token)  # (B, V), a fresh buffer
    top = words.bitwise_right_shift_(12).bitwise_and_((1 << 52) - 1)  # the top 52 bits
    # (m + 0.5) / 2**52 lies in [2**-53, 1 - 2**-53], both exact in float64: never 0 or 1.
    return top.double().add_(0.5).div_(2.0**52)


def gumbel_noise(keys: Tensor, step: int, vocab: int) -> Tensor:
    """(B, vocab) float64 Gumbel(0, 1) noise -log(-log(u)): argmax(scores + noise) is a draw
    from softmax(scores). Float64, so that the noise reaches 36.7 and a token far below the
    top keeps its (tiny) chance."""
    return uniforms(keys, step, vocab).log_().neg_().log_().neg_()


class GumbelNoise(LogitsProcessor):
    """Adds each row's Gumbel noise (`gumbel_noise`) to the scores; run last, it turns greedy
    `generate` into sampling. A -inf score (a token top-p removed) stays -inf.

    Args:
        keys: (B,) int64, one key per row of the batch (`row_keys`).
        prompt_width: the padded prompt's width: the step is the number of tokens generated.
    """

    def __init__(self, keys: Tensor, prompt_width: int) -> None:
        self.keys = keys
        self.prompt_width = prompt_width

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.keys.device != scores.device:
            self.keys = self.keys.to(scores.device)
        step = input_ids.shape[1] - self.prompt_width
        return scores + gumbel_noise(self.keys, step, scores.shape[1]).to(scores.dtype)
