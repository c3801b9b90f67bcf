"""Reward functions, which score sampled completions in online KTO, and `score`, which calls one
and checks what it returns.

A reward function takes a whole batch at once: element i of `prompts`, `completions` and `rows`
belongs to completion i (a prompt sampled k times appears k times), and `rows[i]` is that
prompt's data row, with whatever extra fields the function reads (a reference answer, a pattern,
test cases). It returns one float per completion. The built-ins are small classes configured by
keyword arguments, so that a config names one with `_target_`: `ExactMatch`, `RegexMatch`,
`ConsistencyVerifier` (the bundled consistency task) and `RewardModel` (reward_model.py). A
function of your own is named by its import path (`reward_from_path`).
"""

from __future__ import annotations

import functools
import importlib
import math
import numbers
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol

import torch

from kto_lightning.data.toy import CONSISTENCY, CONSISTENCY_PROMPT, stated_object
from kto_lightning.errors import ConfigError, KTOError, RewardError

EXCERPT_CHARS = 60  # of a prompt, quoted in an error to say which row failed


class RewardFunction(Protocol):
    """What scores completions: one float per completion, for a whole batch at once.

    Args:
        prompts: the prompt of each completion (a prompt sampled k times appears k times).
        completions: the sampled completions, as text.
        rows: the data row of each completion's prompt, with any extra fields.

    Returns:
        One reward per completion, in their order; higher is better.
    """

    def __call__(
        self, prompts: list[str], completions: list[str], rows: list[dict[str, Any]]
    ) -> Sequence[float]: ...


def function_name(reward_fn: object) -> str:
    """How an error names a reward function: its qualified name, or its class's for an object."""
    return getattr(reward_fn, "__qualname__", None) or type(reward_fn).__name__


def row_name(index: int, prompt: str) -> str:
    """`row 3 (prompt 'Mia keeps a ...')`: a row by its index in the batch and its prompt."""
    excerpt = prompt[:EXCERPT_CHARS] + ("..." if len(prompt) > EXCERPT_CHARS else "")
    return f"row {index} (prompt {excerpt!r})"


def _one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def score(
    reward_fn: RewardFunction,
    prompts: list[str],
    completions: list[str],
    rows: list[dict[str, Any]],
) -> torch.Tensor:
    """The rewards of `reward_fn` on a batch, checked: a float32 tensor, one per completion (CPU).

    Rewards may be any real numbers, booleans included (True is 1.0: a verifier may return
    `completion == answer`), as a list, a tuple, a 1-D tensor or an array.

    Raises:
        RewardError: in one line naming the function and the row, when the function raises
            (the first row that raises alone is found by calling it row by row, and its error
            chained), returns the wrong number of rewards, or returns something that is not a
            finite real number. A KTOError the function raises itself (it already names what to
            fix) passes through unchanged.
    """
    if not len(prompts) == len(completions) == len(rows):
        raise ValueError(
            f"prompts, completions and rows must have one entry per completion, got "
            f"{len(prompts)}, {len(completions)} and {len(rows)}"
        )
    try:
        result = reward_fn(prompts, completions, rows)
    except KTOError:
        raise
    except Exception as error:
        _raise_failure(reward_fn, prompts, completions, rows, error)
    return torch.tensor(_checked(reward_fn, result, prompts), dtype=torch.float32)


def _raise_failure(
    reward_fn: RewardFunction,
    prompts: list[str],
    completions: list[str],
    rows: list[dict[str, Any]],
    error: Exception,
) -> NoReturn:
    """Raise the RewardError for a call that raised `error`: it names the first row that raises
    alone, and is raised from that row's error."""
    name = function_name(reward_fn)
    for i, (prompt, completion, row) in enumerate(zip(prompts, completions, rows, strict=True)):
        try:
            reward_fn([prompt], [completion], [row])
        except Exception as row_error:
            raise RewardError(
                f"reward function {name} failed on {row_name(i, prompt)}: {_one_line(row_error)}"
            ) from row_error
    raise RewardError(
        f"reward function {name} failed on the batch of {len(prompts)} completions, though on "
        f"no row alone: {_one_line(error)}"
    ) from error


def _checked(reward_fn: RewardFunction, result: object, prompts: list[str]) -> list[float]:
    """`result` as floats: one per prompt, each a finite real number."""
    name = function_name(reward_fn)
    to_list = getattr(result, "tolist", None)  # a tensor or a numpy array
    if callable(to_list):
        result = to_list()
    if isinstance(result, (str, bytes)) or not isinstance(result, Sequence):
        raise RewardError(
            f"reward function {name} returned a {type(result).__name__}, not a sequence of floats "
            "(one per completion)"
        )
    if len(result) != len(prompts):
        raise RewardError(
            f"reward function {name} returned {len(result)} rewards for {len(prompts)} "
            "completions; it must return one per completion"
        )
    for i, value in enumerate(result):
        if not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise RewardError(
                f"reward function {name} returned {value!r} for {row_name(i, prompts[i])}; a "
                "reward must be a finite real number"
            )
    return [float(value) for value in result]


def _row_field(
    reward_fn: object, rows: list[dict[str, Any]], prompts: list[str], i: int, key: str
) -> Any:
    """`rows[i][key]`; RewardError naming the function, the row and the field when it is absent."""
    if key not in rows[i]:
        raise RewardError(
            f"{function_name(reward_fn)}: {row_name(i, prompts[i])} has no field {key!r}; its "
            f"fields: {', '.join(map(str, rows[i])) or 'none'}"
        )
    return rows[i][key]


@dataclass
class ExactMatch:
    """1.0 where the completion equals a field of its row (the reference answer), else 0.0.

    Args:
        field: the row field that holds the reference answer; a value that is not a string (a
            number) is compared as its `str()`.
        strip: compare without leading and trailing whitespace on either side (a sampled
            completion often ends in a newline).
        ignore_case: compare case-insensitively (`str.casefold`); off, so that "Paris" and
            "paris" differ unless asked.
    """

    field: str = "answer"
    strip: bool = True
    ignore_case: bool = False

    def _normal(self, text: str) -> str:
        text = text.strip() if self.strip else text
        return text.casefold() if self.ignore_case else text

    def __call__(
        self, prompts: list[str], completions: list[str], rows: list[dict[str, Any]]
    ) -> list[float]:
        answers = [str(_row_field(self, rows, prompts, i, self.field)) for i in range(len(rows))]
        return [
            float(self._normal(completion) == self._normal(answer))
            for completion, answer in zip(completions, answers, strict=True)
        ]


@dataclass
class RegexMatch:
    """1.0 where a regular expression matches somewhere in the completion (`re.search`), else 0.0.

    Args:
        pattern: the regular expression, the same for every row; checked when the config is built.
        field: instead of `pattern`, the row field that holds each row's own regular expression.
            Exactly one of the two.
    """

    pattern: str | None = None
    field: str | None = None

    def __post_init__(self) -> None:
        if (self.pattern is None) == (self.field is None):
            raise ConfigError(
                "RegexMatch takes exactly one of pattern (a regular expression) and field (the "
                f"row field that holds one), got pattern={self.pattern!r} and field={self.field!r}"
            )
        self._compiled = _compile(self.pattern, "RegexMatch") if self.pattern is not None else None

    def __call__(
        self, prompts: list[str], completions: list[str], rows: list[dict[str, Any]]
    ) -> list[float]:
        return [
            float(self._regex(prompts, rows, i).search(completion) is not None)
            for i, completion in enumerate(completions)
        ]

    def _regex(self, prompts: list[str], rows: list[dict[str, Any]], i: int) -> re.Pattern[str]:
        if self._compiled is not None:
            return self._compiled
        assert self.field is not None
        pattern = str(_row_field(self, rows, prompts, i, self.field))
        # `re` keeps the patterns it compiled, so a prompt's k samples compile it once.
        return _compile(pattern, f"RegexMatch: field {self.field!r} of {row_name(i, prompts[i])}")


def _compile(pattern: str, where: str) -> re.Pattern[str]:
    """`pattern` compiled; ConfigError naming `where` and the pattern when it is not a regex."""
    try:
        return re.compile(pattern)
    except re.error as error:
        raise ConfigError(
            f"{where}: pattern {pattern!r} is not a valid regular expression: {error}"
        ) from None


@dataclass
class ConsistencyVerifier:
    """The verifier of the bundled consistency task (`data.source.path=toy_consistency`).

    A prompt states the object a person keeps ("Mia keeps a brashnt in the box. What does Mia
    keep in the box?"); a completion earns 1.0 when it names that object as a whole word
    (case-sensitive), else 0.0. The object is read from the prompt by the task's own template
    (`data/toy.py`, `stated_object`); a prompt of another form is a RewardError naming the row.
    """

    def __call__(
        self, prompts: list[str], completions: list[str], rows: list[dict[str, Any]]
    ) -> list[float]:
        return [
            self._reward(i, prompt, completion)
            for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True))
        ]

    def _reward(self, i: int, prompt: str, completion: str) -> float:
        kept = stated_object(prompt)
        if kept is None:
            raise RewardError(
                f"ConsistencyVerifier: {row_name(i, prompt)} is not a prompt of the bundled "
                f"consistency task ({CONSISTENCY_PROMPT!r}); it scores data.source.path="
                f"{CONSISTENCY} only"
            )
        return float(re.search(rf"\b{re.escape(kept)}\b", completion) is not None)


def reward_from_path(path: str) -> RewardFunction:
    """The reward function at an import path: "package.module:function" (or "...module.function").

    For a reward function of your own: `_target_: kto_lightning.online.rewards.reward_from_path`
    with `path: my_package.rewards:my_reward`. The part after ":" may name an attribute of an
    attribute ("module:Class.method").

    Raises:
        ConfigError: naming the path and what failed: the module does not import, it has no
            such attribute, or the attribute is not callable.
    """
    module_name, _, attribute = path.partition(":") if ":" in path else path.rpartition(".")
    if not module_name or not attribute:
        raise ConfigError(
            f"reward function {path!r} is not an import path; write it as 'package.module:function'"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # the module's own code may raise anything while it imports
        raise ConfigError(
            f"reward function {path!r}: module {module_name!r} does not import ({_one_line(error)})"
        ) from error
    try:
        found = functools.reduce(getattr, attribute.split("."), module)
    except AttributeError:
        raise ConfigError(
            f"reward function {path!r}: module {module_name!r} has no attribute {attribute!r}"
        ) from None
    if not callable(found):
        raise ConfigError(
            f"reward function {path!r} names a {type(found).__name__}, which is not callable"
        )
    return found
