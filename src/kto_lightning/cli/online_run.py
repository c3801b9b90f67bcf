"""An online KTO run's parts, built from the config (`online=step`): the prompt data, the
sampler, the reward function, the labelling and `OnlineKTOModule`.

The prompts are read with the `data` group's keys: `data.source` and `data.columns.prompt` (and
`chat_template`) say where the prompts are, `data.batching.batch_size` is the prompts a rank
samples for per step, `data.lengths.max_prompt_length` cuts a prompt and `data.lengths.max_length`
a prompt with its completion. Every other `data` key is for rows with completions and is not
read.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedTokenizerBase

from kto_lightning.core.logprobs import CausalLM
from kto_lightning.core.losses import KTOLossConfig
from kto_lightning.errors import ConfigError
from kto_lightning.models.reference import build_provider, reference_note, resolved_kind
from kto_lightning.online.labelling import Labelling
from kto_lightning.online.prompt_data import PromptDataModule
from kto_lightning.online.reward_model import RewardModel
from kto_lightning.online.rewards import RewardFunction
from kto_lightning.online.round_data import RoundDataModule
from kto_lightning.online.sampler import HFSampler
from kto_lightning.training.online import CACHE_REFUSED, OnlineKTOModule
from kto_lightning.training.online_round import RoundKTOModule, checked_reference
from kto_lightning.training.sft import SFTLoss

log = logging.getLogger("kto_lightning")

# The reward model's dtype under the trainer's precision: it scores as the policy computes.
_PRECISION_DTYPE = {"bf16-mixed": "bfloat16", "bf16-true": "bfloat16", "16-mixed": "float16"}

LOOPS = ("step", "round")


def _settings(node: DictConfig, key: str) -> dict[str, Any]:
    settings = OmegaConf.to_container(node, resolve=True)
    assert isinstance(settings, dict), key
    return {str(name): value for name, value in settings.items()}


def online_datamodule(cfg: DictConfig, tokenizer: PreTrainedTokenizerBase) -> PromptDataModule:
    """The prompts of an online run, read with the `data` group's keys (see the module); the
    `round` loop's also count its rounds' steps."""
    data = cfg.data
    settings: dict[str, Any] = dict(
        tokenizer=tokenizer,
        source=_settings(data.source, "data.source"),
        columns=_settings(data.columns, "data.columns"),
        prompts_per_step=data.batching.batch_size,
        max_prompt_length=data.lengths.max_prompt_length,
        seed=cfg.seed,
        num_workers=data.batching.num_workers,
    )
    if _loop(cfg) == "step":
        return PromptDataModule(**settings)
    rounds = cfg.online.round
    return RoundDataModule(
        prompts_per_round=rounds.prompts,
        k=cfg.online.sampling.k,
        rows_per_step=data.batching.batch_size,
        sample_batch_size=rounds.sample_batch_size,
        **settings,
    )


def _loop(cfg: DictConfig) -> str:
    loop = str(cfg.online.get("loop", "step"))
    if loop not in LOOPS:
        raise ConfigError(f"online.loop must be one of {LOOPS}, got {loop!r}")
    return loop


def _sampler(tokenizer: PreTrainedTokenizerBase, settings: dict[str, Any]) -> HFSampler:
    try:
        return HFSampler.from_tokenizer(tokenizer, **settings)
    except TypeError as error:  # a key HFSampler does not take
        raise ConfigError(
            f"online.sampling: {error}; its keys are k, temperature, top_p, max_new_tokens and "
            "stop_token_ids"
        ) from error


def _reward(cfg: DictConfig) -> RewardFunction:
    if cfg.get("reward") is None:
        raise ConfigError(
            "online=step needs a reward function: reward=consistency, exact_match, regex_match, "
            "reward_model or function (conf/reward/)"
        )
    reward = instantiate(cfg.reward)
    if isinstance(reward, RewardModel) and reward.dtype is None:
        reward.dtype = _PRECISION_DTYPE.get(str(cfg.trainer.precision))
    return reward


def online_module(
    cfg: DictConfig,
    loss_config: KTOLossConfig | SFTLoss,
    policy: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    datamodule: PromptDataModule,
) -> OnlineKTOModule:
    """`OnlineKTOModule` with its reference, sampler, reward function and labelling."""
    if not isinstance(loss_config, KTOLossConfig):
        raise ConfigError("online=step trains with loss=kto (or apo_zero_unpaired), not loss=sft")
    if resolved_kind(cfg.reference.kind, policy) == "cache":  # before the provider is built
        raise ConfigError(CACHE_REFUSED)
    # The batches are prompt rows that stay on the host (OnlineKTOModule.transfer_batch_to_device);
    # Lightning warns that the module's hook is the one used, which is the point.
    warnings.filterwarnings("ignore", message="You have overridden `transfer_batch_to_device`")
    # A round of fewer steps than trainer.log_every_n_steps: Lightning warns that the epoch logs
    # nothing, but it counts the logging interval over the run's steps, not the epoch's.
    warnings.filterwarnings("ignore", message="The number of training batches .* logging interval")
    online = cfg.online
    sampling = _settings(online.sampling, "online.sampling")
    sampler = _sampler(tokenizer, sampling)
    greedy = _sampler(tokenizer, {**sampling, "k": 1, "temperature": 0.0})
    labelling = Labelling(**_settings(online.labelling, "online.labelling"))
    loop = _loop(cfg)
    # Checked before the provider is built: `refresh` holds no second model.
    round_reference = checked_reference(online.round.reference) if loop == "round" else None
    refresh = round_reference == "refresh"
    reference = None
    if refresh:  # the round-start policy's log-probs: computed by the policy, no second model
        log.info("reference: the policy at each round's start (online.round.reference=refresh)")
    else:
        spec = instantiate(cfg.reference)
        reference = build_provider(
            spec, policy, tokenizer, datamodule, cfg.logprob_chunk_size,
            needs_kl_rows=loss_config.needs_kl_rows, precision=cfg.trainer.precision,
            deferred=True, sharded=False,
        )  # fmt: skip
        log.info("%s", reference_note(spec.kind, reference, policy))
    log.info(
        "online KTO (%s loop): %d prompts a %s, k=%d completions each (temperature %g, top_p %g, "
        "at most %d new tokens), labelled by %s",
        loop,
        datamodule.round_size() if isinstance(datamodule, RoundDataModule)
        else datamodule.prompts_per_step,
        "round" if loop == "round" else "step", sampler.k, sampler.temperature, sampler.top_p,
        sampler.max_new_tokens, labelling.rule,
    )  # fmt: skip
    parts: dict[str, Any] = dict(
        policy=policy,
        loss_config=loss_config,
        optimizer=instantiate(cfg.optimizer),
        tokenizer=tokenizer,
        sampler=sampler,
        reward=_reward(cfg),
        labelling=labelling,
        max_length=cfg.data.lengths.max_length,
        seed=cfg.seed,
        greedy_sampler=greedy,
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        logprob_chunk_size=cfg.logprob_chunk_size,
    )
    if loop == "round":
        assert round_reference is not None
        return RoundKTOModule(reference=reference, round_reference=round_reference, **parts)
    assert reference is not None
    return OnlineKTOModule(reference=reference, **parts)
