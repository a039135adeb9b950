"""Chapter 08's exercise checks: right answers pass and are kept, each named
mistake is named, an untouched exercise gets no hint, and a wrong answer is not
kept."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sdlearn.checks import answers
from sdlearn.checks import samplers as checks
from sdlearn.checks import sigma_sampling as sigma_checks
from sdlearn.schedulers import euler, euler_ancestral
from sdlearn.schedulers.dpm_solver import alpha_sigma, log_snr
from tests.helpers import assert_refused, assert_unsolved_never_raise

# --- right answers, written as a learner would ---


def ddim_update(pred_original_sample, pred_epsilon, alpha_bar_prev, sigma):
    direction = torch.sqrt(1 - alpha_bar_prev - sigma**2) * pred_epsilon
    return torch.sqrt(alpha_bar_prev) * pred_original_sample + direction


def ddim_sigma(alpha_bar_t, alpha_bar_prev, eta):
    beta = 1 - alpha_bar_t / alpha_bar_prev
    return eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta)


def euler_step(sample, pred_original_sample, sigma, sigma_next):
    d = (sample - pred_original_sample) / sigma
    dt = sigma_next - sigma
    return sample + d * dt


def euler_mix(sample, pred_original_sample, sigma, sigma_next):
    # the same step as a mix of the sample and the clean guess
    ratio = sigma_next / sigma
    return ratio * sample + (1 - ratio) * pred_original_sample


def ancestral_sigmas(sigma, sigma_next):
    sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
    return sigma_up, (sigma_next**2 - sigma_up**2) ** 0.5


def ancestral_sqrt(sigma, sigma_next):
    # sigma_up^2 simplifies; sigma_down = sigma_next^2 / sigma
    sigma_up = sigma_next * torch.sqrt(1 - sigma_next**2 / sigma**2)
    return sigma_up, sigma_next**2 / sigma


def ancestral_step(sample, pred_original_sample, sigma, sigma_next, noise):
    sigma_up, sigma_down = ancestral_sigmas(sigma, sigma_next)
    stepped = euler_step(sample, pred_original_sample, sigma, sigma_down)
    return stepped + sigma_up * noise


def karras_sigmas(sigma_min, sigma_max, num_inference_steps, rho=7.0):
    ramp = np.linspace(0, 1, num_inference_steps)
    high, low = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (high + ramp * (low - high)) ** rho


def dpm_solver_first_order(sample, pred_original_sample, sigma_s, sigma_t):
    # alpha_sigma and log_snr: the package's, which the kept file can call
    alpha_t, s_t = alpha_sigma(sigma_t)
    _, s_s = alpha_sigma(sigma_s)
    h = log_snr(sigma_t) - log_snr(sigma_s)
    return (s_t / s_s) * sample - alpha_t * (torch.exp(-h) - 1) * pred_original_sample


def dpm_solver_second_order(sample, pred_original_samples, sigmas, solver_type):
    m1, m0 = pred_original_samples
    sigma_s1, sigma_s0, sigma_t = sigmas
    alpha_t, s_t = alpha_sigma(sigma_t)
    _, s_s0 = alpha_sigma(sigma_s0)
    h = log_snr(sigma_t) - log_snr(sigma_s0)
    h_0 = log_snr(sigma_s0) - log_snr(sigma_s1)
    D1 = (m0 - m1) * h / h_0
    x_t = (s_t / s_s0) * sample - alpha_t * (torch.exp(-h) - 1) * m0
    if solver_type == "midpoint":
        return x_t - 0.5 * alpha_t * (torch.exp(-h) - 1) * D1
    return x_t + alpha_t * ((torch.exp(-h) - 1) / h + 1) * D1


RIGHT = [
    ("check_ddim_update", ddim_update, "ddim", "ddim_update"),
    ("check_ddim_sigma", ddim_sigma, "ddim", "ddim_sigma"),
    ("check_euler_step", euler_step, "euler", "euler_step"),
    ("check_euler_step", euler_mix, "euler", "euler_step"),
    ("check_ancestral_sigmas", ancestral_sigmas, "euler_ancestral", "ancestral_sigmas"),
    ("check_ancestral_sigmas", ancestral_sqrt, "euler_ancestral", "ancestral_sigmas"),
    ("check_ancestral_step", ancestral_step, "euler_ancestral", "ancestral_step"),
    ("check_karras_sigmas", karras_sigmas, "sigmas", "karras_sigmas"),
    (
        "check_dpm_solver_first_order",
        dpm_solver_first_order,
        "dpm_solver",
        "dpm_solver_first_order",
    ),
    (
        "check_dpm_solver_second_order",
        dpm_solver_second_order,
        "dpm_solver",
        "dpm_solver_second_order",
    ),
]


@pytest.mark.parametrize(("check", "fn", "module", "part"), RIGHT)
def test_right_answers_pass_and_are_kept(answers_home, capsys, check, fn, module, part):
    assert getattr(checks, check)(fn)
    out = capsys.readouterr().out
    assert "✅" in out and "Hint" not in out
    kept = answers.kept(module)
    assert set(kept) == {part}
    used = answers.use(f"{module}:{part}", None, getattr(checks, check))
    assert answers.is_learners(used)


def test_the_packages_own_functions_pass(answers_home, capsys):
    from sdlearn.schedulers import ddim, dpm_solver, sigmas

    for check, fn in [
        ("check_ddim_update", ddim.ddim_update),
        ("check_ddim_sigma", ddim.ddim_sigma),
        ("check_euler_step", euler.euler_step),
        ("check_ancestral_sigmas", euler_ancestral.ancestral_sigmas),
        ("check_ancestral_step", euler_ancestral.ancestral_step),
        ("check_karras_sigmas", sigmas.karras_sigmas),
        ("check_dpm_solver_first_order", dpm_solver.dpm_solver_first_order),
        ("check_dpm_solver_second_order", dpm_solver.dpm_solver_second_order),
    ]:
        assert getattr(checks, check)(fn), check


def test_install_puts_an_answer_into_every_sampler_that_calls_it(monkeypatch, capsys):
    for module in checks.SAMPLER_MODULES:
        if "euler_step" in vars(module):
            monkeypatch.setattr(module, "euler_step", vars(module)["euler_step"])
    checks.install("euler_step", euler_mix)
    assert (
        "euler_step: the samplers of euler, euler_ancestral now run the package's"
        in (capsys.readouterr().out)
    )
    assert euler.euler_step is euler_mix
    assert euler_ancestral.euler_step is euler_mix


# --- the named mistakes: each one made, each one named ---

MISTAKES = [
    ("check_ddim_update", checks.DDIM_UPDATE_MISTAKES),
    ("check_ddim_sigma", checks.DDIM_SIGMA_MISTAKES),
    ("check_euler_step", checks.EULER_MISTAKES),
    ("check_ancestral_sigmas", checks.ANCESTRAL_SIGMAS_MISTAKES),
    ("check_ancestral_step", checks.ANCESTRAL_STEP_MISTAKES),
    ("check_karras_sigmas", checks.KARRAS_MISTAKES),
    ("check_dpm_solver_first_order", checks.FIRST_ORDER_MISTAKES),
    ("check_dpm_solver_second_order", checks.SECOND_ORDER_MISTAKES),
]


@pytest.mark.parametrize(
    ("check", "message"),
    [(check, message) for check, mistakes in MISTAKES for message in mistakes],
    ids=lambda v: v[:40],
)
def test_named_mistakes_are_named(answers_home, capsys, check, message):
    wrong = dict(MISTAKES)[check][message]
    out = assert_refused(getattr(checks, check), wrong, capsys)
    assert message in out


def ancestral_floats(sigma, sigma_next):
    s, n = float(sigma), float(sigma_next)
    up = math.sqrt(n**2 * (s**2 - n**2) / s**2)
    return up, math.sqrt(n**2 - up**2)


def karras_torch(sigma_min, sigma_max, num_inference_steps, rho=7.0):
    return torch.from_numpy(karras_sigmas(sigma_min, sigma_max, num_inference_steps))


@pytest.mark.parametrize(
    ("check", "wrong"),
    [
        ("check_ancestral_sigmas", ancestral_floats),
        ("check_karras_sigmas", karras_torch),
    ],
    ids=lambda v: getattr(v, "__name__", v),
)
def test_other_slips_fail_with_a_hint(answers_home, capsys, check, wrong):
    assert_refused(getattr(checks, check), wrong, capsys)


def euler_mix_swapped(sample, pred_original_sample, sigma, sigma_next):
    ratio = sigma_next / sigma
    return ratio * pred_original_sample + (1 - ratio) * sample


def test_a_wrong_answer_replaces_a_kept_one(answers_home, capsys):
    assert checks.check_euler_step(euler_step)
    assert not checks.check_euler_step(euler_mix_swapped)
    assert "euler_step" not in answers.kept("euler")
    fn = answers.use("euler:euler_step", euler.euler_step, checks.check_euler_step)
    assert fn is euler.euler_step
    assert "the package's stands in" in capsys.readouterr().out


def test_unsolved_exercises_never_raise_nor_hint(answers_home, capsys):
    assert_unsolved_never_raise([getattr(checks, c) for c, _ in MISTAKES], capsys)
    for module in ("ddim", "euler", "euler_ancestral", "sigmas", "dpm_solver"):
        assert answers.kept(module) == {}


# --- the sigma view: x_0 from the model's output, and the loop ---


def sigma_original_sample(model_output, sample, sigma, prediction_type):
    if prediction_type == "epsilon":
        return sample - sigma * model_output
    if prediction_type == "sample":
        return model_output
    x_t = sample / torch.sqrt(sigma**2 + 1)
    alpha, noise = 1 / torch.sqrt(sigma**2 + 1), sigma / torch.sqrt(sigma**2 + 1)
    return alpha * x_t - noise * model_output


def sample_sigmas(denoise, sample, sigmas, sampler, generator=None):
    x, previous = sample, None
    n = len(sigmas) - 1
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x_0 = denoise(x, sigma)
        if sampler == "euler":
            x = euler_step(x, x_0, sigma, sigma_next)
        elif sampler == "heun" and sigma_next == 0:
            x = x_0  # an Euler step onto sigma 0 lands on x_0
        elif sampler == "heun":
            d = (x - x_0) / sigma
            x_euler = x + (sigma_next - sigma) * d
            d_next = (x_euler - denoise(x_euler, sigma_next)) / sigma_next
            x = x + (sigma_next - sigma) * (d + d_next) / 2
        elif sampler == "euler_ancestral":
            noise = torch.randn(x.shape, generator=generator)
            x = ancestral_step(x, x_0, sigma, sigma_next, noise)
        else:
            alpha, alpha_next = alpha_sigma(sigma)[0], alpha_sigma(sigma_next)[0]
            if previous is None or (i == n - 1 and (n < 15 or sigma_next == 0)):
                x_t = dpm_solver_first_order(alpha * x, x_0, sigma, sigma_next)
            else:
                x_t = dpm_solver_second_order(
                    alpha * x,
                    (previous, x_0),
                    (sigmas[i - 1], sigma, sigma_next),
                    "midpoint",
                )
            x, previous = x_t / alpha_next, x_0
    return x


def sigmas_from_alphas_cumprod(alphas_cumprod):
    return torch.sqrt(1 - alphas_cumprod) / torch.sqrt(alphas_cumprod)


def test_sigma_view_answers_pass_and_are_kept(answers_home, capsys):
    assert sigma_checks.check_sigmas_from_alphas_cumprod(sigmas_from_alphas_cumprod)
    assert sigma_checks.check_sigma_original_sample(sigma_original_sample)
    assert sigma_checks.check_sample_sigmas(sample_sigmas)
    out = capsys.readouterr().out
    assert out.count("✅") == 3 and "Hint" not in out
    assert set(answers.kept("sigmas")) == {
        "sigmas_from_alphas_cumprod",
        "sigma_original_sample",
    }
    assert set(answers.kept("sigma_sampling")) == {"sample_sigmas"}
    loop = answers.use(
        "sigma_sampling:sample_sigmas", None, sigma_checks.check_sample_sigmas
    )
    assert answers.is_learners(loop)


def test_the_checks_loop_without_a_mistake_is_the_packages():
    for case in sigma_checks._loop_cases():
        actual = sigma_checks._run(sigma_checks.reference_loop)(*case.args)
        torch.testing.assert_close(actual, case.expected)


@pytest.mark.parametrize(
    ("check", "message"),
    [
        (check, message)
        for check, mistakes in [
            ("check_sigmas_from_alphas_cumprod", sigma_checks.SIGMAS_MISTAKES),
            ("check_sigma_original_sample", sigma_checks.ORIGINAL_SAMPLE_MISTAKES),
        ]
        for message in mistakes
    ],
    ids=lambda v: v[:40],
)
def test_sigma_view_mistakes_are_named(answers_home, capsys, check, message):
    mistakes = {
        **sigma_checks.SIGMAS_MISTAKES,
        **sigma_checks.ORIGINAL_SAMPLE_MISTAKES,
    }
    out = assert_refused(getattr(sigma_checks, check), mistakes[message], capsys)
    assert message in out


@pytest.mark.parametrize(
    "message", list(sigma_checks.LOOP_MISTAKES), ids=lambda v: v[:40]
)
def test_loop_mistakes_are_named(answers_home, capsys, message):
    wrong = sigma_checks.LOOP_MISTAKES[message].__wrapped__  # a loop, as a learner's
    out = assert_refused(sigma_checks.check_sample_sigmas, wrong, capsys)
    assert message in out
    assert "sample_sigmas" not in answers.kept("sigma_sampling")


# --- the slips a learner trial made, written as a learner writes them ---


def second_order_swapped(sample, pred_original_samples, sigmas, solver_type):
    m0, m1 = pred_original_samples  # the newest guess taken first
    return dpm_solver_second_order(sample, (m1, m0), sigmas, solver_type)


def test_swapped_guesses_are_named(answers_home, capsys):
    out = assert_refused(
        checks.check_dpm_solver_second_order, second_order_swapped, capsys
    )
    assert "(m1, m0) swapped" in out and "wrong values" not in out


def heun_onto_zero(denoise, sample, sigmas, sampler, generator=None):
    if sampler != "heun":
        return sample_sigmas(denoise, sample, sigmas, sampler, generator)
    x = sample
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        d = (x - denoise(x, sigma)) / sigma
        x_euler = x + (sigma_next - sigma) * d
        d_next = (x_euler - denoise(x_euler, sigma_next)) / sigma_next  # 0 / 0
        x = x + (sigma_next - sigma) * (d + d_next) / 2
    return x


def ancestral_randn_like(denoise, sample, sigmas, sampler, generator=None):
    if sampler != "euler_ancestral":
        return sample_sigmas(denoise, sample, sigmas, sampler, generator)
    x = sample
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        x = ancestral_step(x, denoise(x, sigma), sigma, sigma_next, torch.randn_like(x))
    return x


def dpmpp_2m(denoise, sample, sigmas, scaled=True, lower_order_final="both"):
    x, previous, n = sample, None, len(sigmas) - 1
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x_0 = denoise(x, sigma)
        alpha, alpha_next = alpha_sigma(sigma)[0], alpha_sigma(sigma_next)[0]
        if not scaled:  # stepping x itself
            alpha = alpha_next = 1.0
        last = {
            "both": n < 15 or sigma_next == 0,
            "zero": sigma_next == 0,
            "never": False,
        }[lower_order_final] and i == n - 1
        if previous is None or last:
            x_t = dpm_solver_first_order(alpha * x, x_0, sigma, sigma_next)
        else:
            levels = (sigmas[i - 1], sigma, sigma_next)
            x_t = dpm_solver_second_order(
                alpha * x, (previous, x_0), levels, "midpoint"
            )
        x, previous = x_t / alpha_next, x_0
    return x


def dpm_slip(**slip):
    def loop(denoise, sample, sigmas, sampler, generator=None):
        if sampler != "dpmpp_2m":
            return sample_sigmas(denoise, sample, sigmas, sampler, generator)
        return dpmpp_2m(denoise, sample, sigmas, **slip)

    return loop


def test_the_right_dpm_loop_passes(answers_home, capsys):
    assert sigma_checks.check_sample_sigmas(dpm_slip())


@pytest.mark.parametrize(
    ("wrong", "words"),
    [
        (heun_onto_zero, "divides by zero (NaN)"),
        (ancestral_randn_like, "global random state"),
        (dpm_slip(scaled=False), "DPM-Solver++ stepped x itself"),
        (dpm_slip(lower_order_final="never"), "second order on the last step"),
        (dpm_slip(lower_order_final="zero"), "the last step of a short run"),
    ],
    ids=["heun onto 0", "randn_like", "no alpha", "2nd order last", "short run"],
)
def test_the_trials_loop_slips_are_named(answers_home, capsys, wrong, words):
    (message,) = [m for m in sigma_checks.LOOP_MISTAKES if words in m]
    out = assert_refused(sigma_checks.check_sample_sigmas, wrong, capsys)
    assert message in out


def test_the_checks_leave_the_global_random_state_alone(answers_home, capsys):
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    assert not sigma_checks.check_sample_sigmas(ancestral_randn_like)
    assert torch.equal(torch.random.get_rng_state(), before)


def test_sigma_view_exercises_never_raise_nor_hint(answers_home, capsys):
    assert_unsolved_never_raise(
        [
            sigma_checks.check_sigmas_from_alphas_cumprod,
            sigma_checks.check_sigma_original_sample,
            sigma_checks.check_sample_sigmas,
        ],
        capsys,
    )
