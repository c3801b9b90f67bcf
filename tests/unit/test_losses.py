"""Tests for kto_lightning.core.losses: hand-worked numbers, gradients, parity with the paper."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from kto_lightning.core.class_weights import AUTO, RECOMMENDED_RATIO, resolve_class_weights
from kto_lightning.core.losses import (
    ESTIMATORS,
    LOSS_TYPES,
    KTOLossConfig,
    KTOLossOutput,
    kl_statistics,
    kto_loss,
    reference_point_from_statistics,
)
from kto_lightning.core.step import StepLogps, kto_step
from kto_lightning.errors import ConfigError, DataError


def kto_loss_single_process(
    policy, reference, labels, config: KTOLossConfig, kl_policy=None, kl_reference=None
) -> KTOLossOutput:
    """The real step (`kto_step`) in one process, for a config with numeric weights."""
    loss, _ = config.with_class_counts(1, 1)  # numeric weights: the counts change nothing
    logps = StepLogps(policy, reference, kl_policy, kl_reference)
    return kto_step(logps, labels, loss).output


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def t(values, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


# --------------------------------------------------------------------------- hand-worked numbers


def test_hand_worked_mismatched_nonzero_reference_point():
    cfg = KTOLossConfig(beta=0.5, desirable_weight=2.0, undesirable_weight=1.5)
    policy = t([-1.0, -2.0])
    reference = t([-1.5, -1.0])
    labels = torch.tensor([True, False])
    # KL log-ratios 0.4 and 0.2 -> z_ref = 0.3 (positive, so the clamp does nothing).
    kl_policy = t([-3.0, -2.0])
    kl_reference = t([-3.4, -2.2])

    out = kto_loss_single_process(policy, reference, labels, cfg, kl_policy, kl_reference)

    z_ref = 0.3
    r0 = 0.5 * (-1.0 - -1.5)  # 0.25
    r1 = 0.5 * (-2.0 - -1.0)  # -0.5
    expected = [
        2.0 * (1.0 - sig(r0 - 0.5 * z_ref)),  # desirable: 2 * (1 - sigmoid(0.1))
        1.5 * (1.0 - sig(0.5 * z_ref - r1)),  # undesirable: 1.5 * (1 - sigmoid(0.65))
    ]
    assert isinstance(out, KTOLossOutput)
    assert_close(out.losses, t(expected))
    assert_close(out.rewards, t([r0, r1]))
    assert_close(out.reference_point, t(z_ref))


def test_negative_mean_kl_log_ratio_is_clamped_to_zero():
    cfg = KTOLossConfig(beta=0.5, desirable_weight=2.0, undesirable_weight=1.5)
    policy = t([-1.0, -2.0])
    reference = t([-1.5, -1.0])
    labels = torch.tensor([True, False])
    # KL log-ratios -0.4 and 0.1 -> mean -0.15 -> z_ref = 0.
    out = kto_loss_single_process(policy, reference, labels, cfg, t([-3.4, -2.1]), t([-3.0, -2.2]))
    assert_close(out.reference_point, t(0.0))
    expected = [2.0 * (1.0 - sig(0.25)), 1.5 * (1.0 - sig(0.5))]
    assert_close(out.losses, t(expected))


@pytest.mark.parametrize("desirable", [True, False])
def test_single_label_batches_are_finite_and_correct(desirable):
    cfg = KTOLossConfig(beta=0.2, desirable_weight=1.3, undesirable_weight=0.7)
    policy = t([-4.0, -6.0, -1.0])
    reference = t([-5.0, -5.0, -3.0])
    labels = torch.full((3,), desirable, dtype=torch.bool)
    kl_policy, kl_reference = t([-2.0, -7.0]), t([-3.0, -8.0])  # z_ref = 1.0

    out = kto_loss_single_process(policy, reference, labels, cfg, kl_policy, kl_reference)

    assert torch.isfinite(out.losses).all()
    assert torch.isfinite(out.rewards).all()
    z = 0.2 * 1.0
    rewards = [0.2 * 1.0, 0.2 * -1.0, 0.2 * 2.0]
    if desirable:
        expected = [1.3 * (1.0 - sig(r - z)) for r in rewards]
    else:
        expected = [0.7 * (1.0 - sig(z - r)) for r in rewards]
    assert_close(out.losses, t(expected))
    assert_close(out.reference_point, t(1.0))


def test_batch_estimator_uses_own_log_ratios():
    cfg = KTOLossConfig(beta=0.1, desirable_weight=1.0, undesirable_weight=2.0, estimator="batch")
    policy = t([-1.0, -3.0, -0.9])
    reference = t([-1.5, -2.0, -2.0])
    labels = torch.tensor([True, False, True])
    # Own log-ratios 0.5, -1.0, 1.1 -> mean 0.2 = z_ref. KL rows, if passed, are ignored.
    out = kto_loss_single_process(policy, reference, labels, cfg, t([100.0]), t([0.0]))
    assert_close(out.reference_point, t(0.2))
    z = 0.1 * 0.2
    expected = [
        1.0 * (1.0 - sig(0.05 - z)),
        2.0 * (1.0 - sig(z - -0.1)),
        1.0 * (1.0 - sig(0.11 - z)),
    ]
    assert_close(out.losses, t(expected))


def test_batch_estimator_negative_mean_is_clamped():
    cfg = KTOLossConfig(beta=1.0, estimator="batch")
    out = kto_loss_single_process(
        t([-2.0, -3.0]), t([-1.0, -1.0]), torch.tensor([True, False]), cfg
    )
    assert_close(out.reference_point, t(0.0))
    assert_close(out.losses, t([1.0 - sig(-1.0), 1.0 - sig(2.0)]))


def test_zero_estimator_ignores_kl_rows():
    cfg = KTOLossConfig(beta=0.5, desirable_weight=1.0, undesirable_weight=3.0, estimator="zero")
    policy, reference = t([-1.0, -2.0]), t([-2.0, -1.0])
    labels = torch.tensor([True, False])
    out = kto_loss_single_process(policy, reference, labels, cfg, t([50.0]), t([0.0]))
    assert_close(out.reference_point, t(0.0))
    assert_close(out.losses, t([1.0 - sig(0.5), 3.0 * (1.0 - sig(0.5))]))


def test_apo_zero_unpaired_numbers():
    cfg = KTOLossConfig(
        beta=0.5, desirable_weight=2.0, undesirable_weight=0.5, loss_type="apo_zero_unpaired"
    )
    policy, reference = t([-1.0, -2.0, -1.0]), t([-2.0, -1.0, -1.6])
    labels = torch.tensor([True, False, False])
    # A large positive z_ref passed explicitly must be ignored.
    out = kto_loss(policy, reference, labels, t(7.0), cfg)
    r = [0.5, -0.5, 0.3]
    expected = [2.0 * (1.0 - sig(r[0])), 0.5 * sig(r[1]), 0.5 * sig(r[2])]
    assert_close(out.losses, t(expected))
    assert_close(out.rewards, t(r))
    assert_close(out.reference_point, t(0.0))


def test_apo_single_process_needs_no_kl_rows_even_with_mismatched_estimator():
    cfg = KTOLossConfig(loss_type="apo_zero_unpaired", estimator="mismatched")
    assert not cfg.needs_kl_rows
    out = kto_loss_single_process(t([-1.0]), t([-1.0]), torch.tensor([True]), cfg)
    assert_close(out.losses, t([0.5]))


# --------------------------------------------------------------------------------- gradients


def closed_form_grad(policy, reference, labels, z_ref, cfg):
    """Prop 4.1, derived by hand.

    r = beta * (p - q). Desirable: L = wd * (1 - s(z)), z = r - beta*z_ref, dz/dp = beta, so
    dL/dp = -wd * beta * s(z) * s(-z). Undesirable: L = wu * (1 - s(z)), z = beta*z_ref - r,
    dz/dp = -beta, so dL/dp = +wu * beta * s(z) * s(-z). APO-zero is the same with z_ref = 0
    (its undesirable loss wu * s(r) = wu * (1 - s(-r)) has the same derivative).
    """
    beta = cfg.beta
    r = beta * (policy - reference)
    z = torch.where(labels, r - beta * z_ref, beta * z_ref - r)
    lam = torch.where(
        labels,
        torch.full_like(r, -cfg.desirable_weight),
        torch.full_like(r, cfg.undesirable_weight),
    )
    return lam * torch.sigmoid(z) * torch.sigmoid(-z) * beta


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_autograd_matches_closed_form(loss_type, estimator):
    gen = torch.Generator().manual_seed(0)
    n, k = 64, 32
    reference = torch.randn(n, generator=gen, dtype=torch.float64) * 3 - 20
    # Log-ratios of mean ~1, so the 'batch' estimator's z_ref is positive too.
    ratios = torch.randn(n, generator=gen, dtype=torch.float64) * 3 + 1
    policy = (reference + ratios).requires_grad_()
    labels = torch.rand(n, generator=gen) < 0.5
    kl_reference = torch.randn(k, generator=gen, dtype=torch.float64) * 3 - 20
    kl_policy = kl_reference + torch.rand(k, generator=gen, dtype=torch.float64) * 4  # z_ref > 0
    cfg = KTOLossConfig(
        beta=0.3,
        desirable_weight=1.7,
        undesirable_weight=0.6,
        estimator=estimator,
        loss_type=loss_type,
    )

    out = kto_loss_single_process(policy, reference, labels, cfg, kl_policy, kl_reference)
    out.losses.sum().backward()

    z_ref = out.reference_point.to(torch.float64)
    if loss_type == "kto" and estimator != "zero":
        assert z_ref > 0  # the reference point really enters the formula
    expected = closed_form_grad(policy.detach(), reference, labels, z_ref, cfg)
    # For 'batch', z_ref depends on policy_logps numerically: a missing detach would add a term.
    assert_close(policy.grad, expected, rtol=1e-12, atol=1e-14)


def test_no_gradient_reaches_reference_point():
    cfg = KTOLossConfig(beta=0.5)
    policy = t([-1.0, -2.0, -3.0]).requires_grad_()
    kl_policy = t([-1.0, -1.5]).requires_grad_()
    kl_reference = t([-2.0, -2.0]).requires_grad_()
    labels = torch.tensor([True, False, True])

    out = kto_loss_single_process(
        policy, t([-2.0, -2.0, -2.0]), labels, cfg, kl_policy, kl_reference
    )
    assert_close(out.reference_point, t(0.75))
    out.losses.sum().backward()

    for tensor in (kl_policy, kl_reference):
        assert tensor.grad is None or torch.count_nonzero(tensor.grad) == 0
    assert policy.grad is not None and torch.count_nonzero(policy.grad) == 3
    assert not out.rewards.requires_grad
    assert not out.reference_point.requires_grad


def test_reference_point_argument_gets_no_gradient():
    cfg = KTOLossConfig()
    z_ref = t(0.4).requires_grad_()
    policy = t([-1.0, -2.0]).requires_grad_()
    out = kto_loss(policy, t([-1.5, -1.0]), torch.tensor([True, False]), z_ref, cfg)
    out.losses.sum().backward()
    assert z_ref.grad is None
    assert not out.reference_point.requires_grad


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradient_vanishes_at_saturation(loss_type):
    cfg = KTOLossConfig(beta=0.1, loss_type=loss_type, estimator="zero")
    # Log-ratios of +/-1000 give |r| = 100, for both labels.
    policy = t([1000.0, -1000.0, 1000.0, -1000.0]).requires_grad_()
    labels = torch.tensor([True, True, False, False])
    out = kto_loss_single_process(policy, torch.zeros(4), labels, cfg)
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all()
    assert policy.grad.abs().max() < 1e-8
    # ...while near r = 0 it is far from zero: the test could fail.
    policy0 = torch.zeros(4, requires_grad=True)
    kto_loss_single_process(policy0, torch.zeros(4), labels, cfg).losses.sum().backward()
    assert policy0.grad.abs().min() > 1e-3


# ---------------------------------------------------------------- parity with published formula


def trl_style_kto(policy, reference, labels, kl_policy, kl_reference, beta, wd, wu):
    """Straight transcription of the published KTO loss (as in TRL's KTOTrainer.kto_loss)."""
    kl = (kl_policy - kl_reference).mean().clamp(min=0)
    chosen = policy[labels] - reference[labels]
    rejected = policy[~labels] - reference[~labels]
    chosen_losses = 1 - torch.sigmoid(beta * (chosen - kl))
    rejected_losses = 1 - torch.sigmoid(beta * (kl - rejected))
    return wd * chosen_losses, wu * rejected_losses, kl


def trl_style_apo(policy, reference, labels, beta, wd, wu):
    chosen = policy[labels] - reference[labels]
    rejected = policy[~labels] - reference[~labels]
    return wd * (1 - torch.sigmoid(beta * chosen)), wu * torch.sigmoid(beta * rejected)


@pytest.mark.parametrize("seed", range(5))
def test_parity_with_published_kto_formula(seed):
    gen = torch.Generator().manual_seed(seed)
    n, k = 40, 17
    policy = torch.randn(n, generator=gen) * 5 - 30
    reference = torch.randn(n, generator=gen) * 5 - 30
    labels = torch.rand(n, generator=gen) < 0.6
    kl_policy = torch.randn(k, generator=gen) * 5 - 30
    kl_reference = torch.randn(k, generator=gen) * 5 - 30 - (seed - 2)  # mean KL of either sign
    beta, wd, wu = 0.05 + 0.1 * seed, 1.0 + seed, 1.33

    cfg = KTOLossConfig(beta=beta, desirable_weight=wd, undesirable_weight=wu)
    out = kto_loss_single_process(policy, reference, labels, cfg, kl_policy, kl_reference)
    chosen, rejected, kl = trl_style_kto(
        policy, reference, labels, kl_policy, kl_reference, beta, wd, wu
    )
    assert_close(out.reference_point, kl)
    assert_close(out.losses[labels], chosen)
    assert_close(out.losses[~labels], rejected)
    assert_close(out.rewards, beta * (policy - reference))

    apo_cfg = KTOLossConfig(
        beta=beta, desirable_weight=wd, undesirable_weight=wu, loss_type="apo_zero_unpaired"
    )
    apo = kto_loss_single_process(policy, reference, labels, apo_cfg)
    apo_chosen, apo_rejected = trl_style_apo(policy, reference, labels, beta, wd, wu)
    assert_close(apo.losses[labels], apo_chosen)
    assert_close(apo.losses[~labels], apo_rejected)


# ----------------------------------------------------------------------- statistics / reduction


@pytest.mark.parametrize("estimator", ["mismatched", "batch"])
def test_split_statistics_sum_to_whole_batch(estimator):
    gen = torch.Generator().manual_seed(1)
    policy, reference = torch.randn(7, generator=gen), torch.randn(7, generator=gen) - 1
    kl_policy, kl_reference = torch.randn(7, generator=gen), torch.randn(7, generator=gen) - 1
    whole = reference_point_from_statistics(
        *kl_statistics(estimator, policy, reference, kl_policy, kl_reference)
    )
    # Uneven "ranks" (3 and 4 rows): summing (sum, count) is exact; averaging means would not be.
    a = kl_statistics(estimator, policy[:3], reference[:3], kl_policy[:3], kl_reference[:3])
    b = kl_statistics(estimator, policy[3:], reference[3:], kl_policy[3:], kl_reference[3:])
    split = reference_point_from_statistics(a[0] + b[0], a[1] + b[1])
    assert whole > 0
    assert_close(split, whole)
    assert_close(a[1] + b[1], t(7.0))
    mean_of_means = (a[0] / a[1] + b[0] / b[1]) / 2
    assert not torch.allclose(mean_of_means, whole)


def test_statistics_values_dtype_and_detach():
    policy = torch.tensor([-1.0, -2.0], dtype=torch.float64, requires_grad=True)
    reference = torch.tensor([-1.5, -1.0], dtype=torch.float64)
    total, count = kl_statistics("batch", policy, reference)
    assert_close(total, t(-0.5))
    assert_close(count, t(2.0))
    for x in (total, count):
        assert x.dtype == torch.float32 and x.shape == () and not x.requires_grad
    total, count = kl_statistics("zero", policy, reference)
    assert_close((total, count), (t(0.0), t(0.0)))


def test_reference_point_from_statistics_edge_cases():
    assert_close(reference_point_from_statistics(t(0.0), t(0.0)), t(0.0))  # no rows: 0, not NaN
    assert_close(reference_point_from_statistics(t(3.0), t(0.0)), t(0.0))
    assert_close(reference_point_from_statistics(t(-3.0), t(2.0)), t(0.0))
    assert_close(reference_point_from_statistics(t(3.0), t(2.0)), t(1.5))
    empty = torch.zeros(0)
    stats = kl_statistics("mismatched", t([1.0]), t([0.0]), empty, empty)
    assert_close(reference_point_from_statistics(*stats), t(0.0))


def test_kl_statistics_errors():
    with pytest.raises(ValueError, match="kl_policy_logps"):
        kl_statistics("mismatched", t([1.0]), t([0.0]))
    with pytest.raises(ConfigError, match=r"loss\.estimator"):
        kl_statistics("nope", t([1.0]), t([0.0]))


# --------------------------------------------------------------------------------- kto_loss misc


def test_half_precision_inputs_compute_in_float32():
    cfg = KTOLossConfig(beta=0.5, estimator="zero")
    policy = t([-1.0, -2.0]).to(torch.bfloat16)
    reference = t([-2.0, -1.0]).to(torch.bfloat16)
    out = kto_loss(policy, reference, torch.tensor([True, False]), t(0.0), cfg)
    assert out.losses.dtype == torch.float32
    assert_close(out.losses, t([1.0 - sig(0.5), 1.0 - sig(0.5)]))


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="same"):
        kto_loss(t([1.0, 2.0]), t([1.0]), torch.tensor([True, False]), t(0.0), KTOLossConfig())


# ------------------------------------------------------------------------------------- config


def test_config_defaults_and_needs_kl_rows():
    cfg = KTOLossConfig()
    assert (cfg.beta, cfg.desirable_weight, cfg.undesirable_weight) == (0.1, 1.0, 1.0)
    assert (cfg.estimator, cfg.loss_type) == ("mismatched", "kto")
    assert cfg.needs_kl_rows
    assert not KTOLossConfig(estimator="batch").needs_kl_rows
    assert not KTOLossConfig(estimator="zero").needs_kl_rows
    assert not KTOLossConfig(loss_type="apo_zero_unpaired").needs_kl_rows
    KTOLossConfig(desirable_weight=0.0)  # one zero weight is allowed


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"beta": 0.0}, r"loss\.beta must be > 0, got 0\.0"),
        ({"beta": -1.0}, r"loss\.beta must be > 0, got -1\.0"),
        ({"beta": float("nan")}, r"loss\.beta"),
        ({"beta": "0.1"}, r"loss\.beta must be a number"),
        ({"desirable_weight": -0.5}, r"loss\.desirable_weight must be >= 0"),
        ({"undesirable_weight": -1.0}, r"loss\.undesirable_weight must be >= 0"),
        ({"desirable_weight": 0.0, "undesirable_weight": 0.0}, r"both 0"),
        ({"estimator": "mean"}, r"loss\.estimator must be one of mismatched, batch, zero"),
        ({"loss_type": "dpo"}, r"loss\.loss_type must be one of kto, apo_zero_unpaired"),
    ],
)
def test_config_rejects_invalid_values(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        KTOLossConfig(**kwargs)


# ------------------------------------------------------------------------------ class weights


def eq8_ratio(w_d: float, w_u: float, n_d: int, n_u: int) -> float:
    return w_d * n_d / (w_u * n_u)


def test_recommended_ratio_is_the_papers_range():
    assert RECOMMENDED_RATIO == (1.0, 4.0 / 3.0)
    assert AUTO == "auto"


@pytest.mark.parametrize(
    ("weights", "counts", "expected"),
    [
        # 100 desirable, 400 undesirable: lambda_D = 1.0 * 400 / 100 = 4.
        (("auto", 1.0), (100, 400), (4.0, 1.0)),
        # lambda_U = 2.0 * 100 / 400 = 0.5.
        ((2.0, "auto"), (100, 400), (2.0, 0.5)),
        # 300 desirable, 100 undesirable, lambda_U = 1.5: lambda_D = 1.5 * 100 / 300 = 0.5.
        (("AUTO", 1.5), (300, 100), (0.5, 1.5)),
        ((1, " Auto "), (30, 10), (1.0, 3.0)),
    ],
)
def test_one_auto_side_makes_the_ratio_one(weights, counts, expected):
    w_d, w_u, warnings = resolve_class_weights(*weights, *counts)
    assert (w_d, w_u) == pytest.approx(expected)
    assert isinstance(w_d, float) and isinstance(w_u, float)
    assert eq8_ratio(w_d, w_u, *counts) == pytest.approx(1.0)
    assert warnings == []


def test_numeric_weights_inside_the_range_pass_unchanged_without_warning():
    # 1.0 * 120 / (1.0 * 100) = 1.2, inside [1, 4/3].
    assert resolve_class_weights(1.0, 1.0, 120, 100) == (1.0, 1.0, [])
    # Both ends are inside: 1.0 exactly, and 4/3 exactly.
    assert resolve_class_weights(1.0, 1.0, 50, 50)[2] == []
    assert resolve_class_weights(4.0, 1.0, 100, 300)[2] == []


def test_numeric_weights_outside_the_range_warn_with_ratio_counts_and_fix():
    w_d, w_u, warnings = resolve_class_weights(1.0, 1.0, 100, 400)
    assert (w_d, w_u) == (1.0, 1.0)
    assert len(warnings) == 1
    message = warnings[0]
    for part in (
        "loss.desirable_weight=1.0",
        "loss.undesirable_weight=1.0",
        "= 0.25",
        "100 desirable and 400 undesirable rows",
        "[1, 4/3]",
        "loss.desirable_weight=4 ",  # 1.0 * 400 / 100 brings the ratio to 1
        "auto",
    ):
        assert part in message, (part, message)


def test_ratio_above_the_range_warns_too():
    # 2.0 * 100 / (1.0 * 100) = 2 > 4/3; lambda_D = 1.0 would bring it to 1.
    _, _, warnings = resolve_class_weights(2.0, 1.0, 100, 100)
    assert len(warnings) == 1
    assert "= 2 with" in warnings[0]
    assert "loss.desirable_weight=1 " in warnings[0]


def test_zero_undesirable_weight_suggests_fixing_the_undesirable_side():
    # lambda_U = 0 makes the ratio infinite; lambda_U = 1.0 * 20 / 10 = 2 brings it to 1.
    _, _, warnings = resolve_class_weights(1.0, 0.0, 20, 10)
    assert "= inf" in warnings[0]
    assert "loss.undesirable_weight=2 " in warnings[0]


@pytest.mark.parametrize(
    ("weights", "counts", "expected", "missing"),
    [
        (("auto", 2.0), (0, 50), (1.0, 2.0), "0 desirable rows"),
        ((2.0, "auto"), (50, 0), (2.0, 1.0), "0 undesirable rows"),
    ],
)
def test_single_class_data_falls_back_to_one_and_warns(weights, counts, expected, missing):
    w_d, w_u, warnings = resolve_class_weights(*weights, *counts)
    assert (w_d, w_u) == expected
    assert len(warnings) == 1
    assert "single-class" in warnings[0]
    assert missing in warnings[0]
    assert "=auto falls back to 1.0" in warnings[0]


def test_single_class_data_with_numeric_weights_warns_without_dividing_by_zero():
    w_d, w_u, warnings = resolve_class_weights(1.0, 1.0, 0, 7)
    assert (w_d, w_u) == (1.0, 1.0)
    assert len(warnings) == 1
    assert "single-class" in warnings[0] and "0 desirable rows" in warnings[0]
    assert "falls back" not in warnings[0]


@pytest.mark.parametrize(
    ("weights", "exception", "match"),
    [
        (("auto", "auto"), ConfigError, r"loss\.desirable_weight and loss\.undesirable_weight"),
        (("Auto", "AUTO"), ConfigError, r"at most one may be 'auto'"),
        (("1.0", 1.0), ConfigError, r"loss\.desirable_weight must be a number >= 0 or 'auto'"),
        ((1.0, "balanced"), ConfigError, r"loss\.undesirable_weight .*got 'balanced'"),
        ((True, 1.0), ConfigError, r"loss\.desirable_weight must be a number"),
        ((1.0, float("inf")), ConfigError, r"loss\.undesirable_weight must be finite"),
        ((-1.0, 1.0), ConfigError, r"loss\.desirable_weight must be >= 0"),
        (("auto", 0.0), ConfigError, r"loss\.undesirable_weight=0 leaves nothing"),
    ],
)
def test_resolve_class_weights_rejects_invalid_values(weights, exception, match):
    with pytest.raises(exception, match=match):
        resolve_class_weights(*weights, 10, 10)


def test_resolve_class_weights_without_rows_raises_data_error():
    with pytest.raises(DataError, match="no rows"):
        resolve_class_weights("auto", 1.0, 0, 0)
