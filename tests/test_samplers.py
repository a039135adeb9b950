"""Tests for chapter 08's samplers: DDIM and its inversion, Euler, Euler
ancestral, DPM-Solver++: each sampling loop equals diffusers' same-named
scheduler."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sdlearn.inversion import invert
from sdlearn.pipeline_io import from_pretrained, save_pretrained
from sdlearn.schedulers import (
    SCHEDULERS,
    DDIMInverseScheduler,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    scheduler_from_config,
    scheduler_to_config,
    with_sampler,
)
from sdlearn.schedulers.euler_ancestral import ancestral_sigmas
from sdlearn.schedulers.sigmas import karras_sigmas, sigma_to_t
from tests.helpers import (
    PROMPTS,
    SIZE,
    fake_model,
    needs_diffusers,
    random_pipeline,
    sample_loop,
)

# a 16x16 RGB picture to start img2img and inpainting from
START = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)

SD = {}  # sdlearn's defaults are Stable Diffusion 1.x's betas
LINEAR = {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}

# (scheduler class, settings, steps, step keyword arguments)
CASES = {
    "euler-sd-50": (EulerDiscreteScheduler, SD, 50, {}),
    "euler-karras-20": (EulerDiscreteScheduler, {"use_karras_sigmas": True}, 20, {}),
    "euler-karras-ends-v": (
        EulerDiscreteScheduler,
        {
            "use_karras_sigmas": True,
            "sigma_min": 0.1,
            "sigma_max": 10.0,
            "prediction_type": "v_prediction",
        },
        9,
        {},
    ),
    "euler-leading-sample-sigma-min": (
        EulerDiscreteScheduler,
        {
            "timestep_spacing": "leading",
            "prediction_type": "sample",
            "final_sigmas_type": "sigma_min",
            **LINEAR,
        },
        15,
        {},
    ),
    "euler-trailing-cosine": (
        EulerDiscreteScheduler,
        {"timestep_spacing": "trailing", "beta_schedule": "squaredcos_cap_v2"},
        7,
        {},
    ),
    "euler-churn": (
        EulerDiscreteScheduler,
        SD,
        12,
        {"s_churn": 2.0, "s_tmin": 0.5, "s_tmax": 8.0, "s_noise": 1.003},
    ),
    "euler-a-sd-30": (EulerAncestralDiscreteScheduler, SD, 30, {}),
    "euler-a-leading": (
        EulerAncestralDiscreteScheduler,
        {"timestep_spacing": "leading", **LINEAR},
        10,
        {},
    ),
    "euler-a-trailing-v": (
        EulerAncestralDiscreteScheduler,
        {"timestep_spacing": "trailing", "prediction_type": "v_prediction"},
        12,
        {},
    ),
    "dpmpp-2m-sd-20": (DPMSolverMultistepScheduler, SD, 20, {}),
    "dpmpp-2m-karras-25": (
        DPMSolverMultistepScheduler,
        {"use_karras_sigmas": True},
        25,
        {},
    ),
    "dpmpp-2m-heun-leading-v": (
        DPMSolverMultistepScheduler,
        {
            "solver_type": "heun",
            "timestep_spacing": "leading",
            "prediction_type": "v_prediction",
        },
        8,
        {},
    ),
    "dpmpp-1-trailing-sample": (
        DPMSolverMultistepScheduler,
        {
            "solver_order": 1,
            "timestep_spacing": "trailing",
            "prediction_type": "sample",
            **LINEAR,
        },
        10,
        {},
    ),
    "dpmpp-2m-sigma-min-no-lower-final": (
        DPMSolverMultistepScheduler,
        {"final_sigmas_type": "sigma_min", "lower_order_final": False},
        6,
        {},
    ),
    "dpmpp-2m-euler-final-clipped-cosine": (
        DPMSolverMultistepScheduler,
        {
            "final_sigmas_type": "sigma_min",
            "euler_at_final": True,
            "lambda_min_clipped": -5.1,
            "beta_schedule": "squaredcos_cap_v2",
        },
        16,
        {},
    ),
    "dpmpp-2m-karras-linear": (
        DPMSolverMultistepScheduler,
        {"use_karras_sigmas": True, **LINEAR},
        11,
        {},
    ),
}


@needs_diffusers
@pytest.mark.parametrize("name", list(CASES))
def test_sampling_loop_matches_diffusers(name):
    cls, settings, steps, step_kwargs = CASES[name]
    ours = cls(**settings)
    theirs = ours.to_diffusers()
    assert type(theirs).__name__ == cls.__name__
    torch.testing.assert_close(ours.sigmas, theirs.sigmas)  # before set_timesteps
    actual = sample_loop(ours, steps, **step_kwargs)
    expected = sample_loop(theirs, steps, **step_kwargs)
    torch.testing.assert_close(ours.timesteps, theirs.timesteps)
    torch.testing.assert_close(ours.sigmas, theirs.sigmas)
    torch.testing.assert_close(
        torch.as_tensor(ours.init_noise_sigma), torch.as_tensor(theirs.init_noise_sigma)
    )
    if cls is DPMSolverMultistepScheduler:
        # diffusers' DPM-Solver returns no pred_original_sample; ours does
        actual = actual[::2]
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@needs_diffusers
@pytest.mark.parametrize("name", ["euler-karras-20", "dpmpp-2m-karras-25"])
def test_add_noise_matches_diffusers_for_img2img(name):
    """img2img starts part-way: set_begin_index, then add_noise, then steps."""
    cls, settings, steps, _ = CASES[name]
    results = []
    for scheduler in (cls(**settings), cls(**settings).to_diffusers()):
        scheduler.set_timesteps(steps)
        start = steps // 3
        scheduler.set_begin_index(start)
        g = torch.Generator().manual_seed(1)
        x0, noise = torch.randn(2, 2, 3, 3, generator=g).unbind(0)
        t0 = scheduler.timesteps[start : start + 1]
        x = scheduler.add_noise(x0[None], noise[None], t0)
        noised = [x]
        for t in scheduler.timesteps[start:]:
            x = scheduler.step(
                fake_model(scheduler.scale_model_input(x, t), t), t, x
            ).prev_sample
            noised.append(x)
        results.append(noised)
    for a, e in zip(*results, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@needs_diffusers
@pytest.mark.parametrize("cls", list(SCHEDULERS.values()))
def test_from_diffusers_and_the_config_file_round_trip(cls):
    import diffusers

    theirs = getattr(diffusers, cls.__name__).from_config(
        {"beta_schedule": "scaled_linear", "timestep_spacing": "trailing"}
    )
    ours = cls.from_diffusers(theirs)
    assert ours.config.timestep_spacing == "trailing"
    # what save_pretrained writes, as JSON, reads back as the same scheduler
    written = json.loads(json.dumps(scheduler_to_config(ours)))
    again = scheduler_from_config(written)
    assert type(again) is cls and again.config == ours.config
    rebuilt = getattr(diffusers, cls.__name__).from_config(written)
    assert cls.from_diffusers(rebuilt).config == ours.config


@needs_diffusers
def test_settings_sdlearn_lacks_are_refused():
    from diffusers import DPMSolverMultistepScheduler as Theirs
    from diffusers import EulerDiscreteScheduler as TheirEuler

    with pytest.raises(ValueError, match="use_lu_lambdas=True is not supported"):
        DPMSolverMultistepScheduler.from_diffusers(Theirs(use_lu_lambdas=True))
    with pytest.raises(ValueError, match="unknown algorithm_type 'sde-dpmsolver"):
        DPMSolverMultistepScheduler.from_diffusers(
            Theirs(algorithm_type="sde-dpmsolver++")
        )
    with pytest.raises(ValueError, match="interpolation_type='log_linear'"):
        EulerDiscreteScheduler.from_diffusers(
            TheirEuler(interpolation_type="log_linear")
        )


def test_with_sampler_keeps_the_noise_schedule_and_takes_the_samplers_spacing():
    model = DDPMScheduler(
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        prediction_type="v_prediction",
        steps_offset=0,
        timestep_spacing="trailing",
    )
    euler = with_sampler(model, "EulerDiscreteScheduler", use_karras_sigmas=True)
    assert isinstance(euler, EulerDiscreteScheduler)
    torch.testing.assert_close(euler.alphas_cumprod, model.alphas_cumprod)
    assert euler.config.prediction_type == "v_prediction"
    assert euler.config.steps_offset == 0 and euler.config.use_karras_sigmas
    # the spacing is a sampling choice: Euler's own default, as in diffusers
    assert euler.config.timestep_spacing == "linspace"
    # the same class keeps every setting
    again = with_sampler(model, "DDPMScheduler")
    assert again.config == model.config and again is not model
    with pytest.raises(ValueError, match="unknown scheduler 'PNDMScheduler'"):
        with_sampler(model, "PNDMScheduler")


def test_karras_sigmas_are_dense_near_sigma_min():
    sigmas = karras_sigmas(0.03, 14.6, 10)
    assert sigmas[0] == pytest.approx(14.6) and sigmas[-1] == pytest.approx(0.03)
    steps = -np.diff(sigmas)
    assert (steps > 0).all() and (np.diff(steps) < 0).all()  # ever shorter steps


def test_sigma_to_t_inverts_the_training_sigmas():
    scheduler = EulerDiscreteScheduler()
    log_sigmas = np.log(scheduler.sigmas[:-1].flip(0).numpy())
    t = sigma_to_t(np.exp(log_sigmas[[0, 10, 500, 999]]), log_sigmas)
    np.testing.assert_allclose(t, [0, 10, 500, 999], atol=1e-3)


def test_ancestral_sigmas_keep_the_total_noise_level():
    sigma, sigma_next = torch.tensor(3.0), torch.tensor(2.0)
    sigma_up, sigma_down = ancestral_sigmas(sigma, sigma_next)
    torch.testing.assert_close(sigma_up**2 + sigma_down**2, sigma_next**2)
    assert sigma_down < sigma_next
    up, down = ancestral_sigmas(torch.tensor(3.0), torch.tensor(0.0))
    assert up == 0 and down == 0  # the last step lands on the clean sample


def test_euler_converges_and_euler_ancestral_does_not():
    """More steps bring Euler's ODE solution closer together; the ancestral
    sampler's images stay apart because every step draws new noise."""

    def final(cls, steps):
        return sample_loop(cls(), steps)[-2]

    euler = [final(EulerDiscreteScheduler, n) for n in (50, 100, 200)]
    ancestral = [final(EulerAncestralDiscreteScheduler, n) for n in (50, 100, 200)]
    euler_gap = (euler[1] - euler[2]).abs().mean()
    ancestral_gap = (ancestral[1] - ancestral[2]).abs().mean()
    assert (euler[0] - euler[2]).abs().mean() > euler_gap  # converging
    assert ancestral_gap > 10 * euler_gap


def test_bad_input_raises_value_error():
    for cls in (
        EulerDiscreteScheduler,
        EulerAncestralDiscreteScheduler,
        DPMSolverMultistepScheduler,
    ):
        scheduler = cls()
        x = torch.zeros(1, 4, 2, 2)
        with pytest.raises(ValueError, match="set_timesteps"):
            scheduler.step(x, scheduler.timesteps[0], x)
        scheduler.set_timesteps(5)
        with pytest.raises(ValueError, match=r"shape \(1, 4, 2, 2\)"):
            scheduler.step(torch.zeros(1, 3, 2, 2), scheduler.timesteps[0], x)
        with pytest.raises(ValueError, match="not one of the timesteps"):
            scheduler.step(x, torch.tensor(3.5), x)
        for t in scheduler.timesteps:
            scheduler.step(x, t, x)
        with pytest.raises(ValueError, match="all 5 steps are done"):
            scheduler.step(x, scheduler.timesteps[-1], x)
    with pytest.raises(ValueError, match="unknown prediction_type 'sample'"):
        EulerAncestralDiscreteScheduler(prediction_type="sample")
    with pytest.raises(ValueError, match="unknown solver_order 3"):
        DPMSolverMultistepScheduler(solver_order=3)
    with pytest.raises(ValueError, match="unknown timestep_spacing 'linspace'"):
        DDIMInverseScheduler(timestep_spacing="linspace")


@needs_diffusers
@pytest.mark.parametrize(
    "settings",
    [{}, {"timestep_spacing": "trailing", "prediction_type": "v_prediction"}],
)
def test_ddim_inversion_loop_matches_diffusers(settings):
    ours = DDIMInverseScheduler(**settings)
    theirs = ours.to_diffusers()
    results = []
    for scheduler in (ours, theirs):
        scheduler.set_timesteps(10)
        x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
        path = []
        for t in scheduler.timesteps:
            out = scheduler.step(fake_model(x, t), t, x)
            x = out.prev_sample
            path += [x, out.pred_original_sample]
        results.append(path)
    torch.testing.assert_close(ours.timesteps, theirs.timesteps)
    for a, e in zip(*results, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


# the pipeline with each sampler: text to image and img2img, against diffusers

PIPELINE_SAMPLERS = {
    "euler": (EulerDiscreteScheduler, {}),
    "euler-karras": (EulerDiscreteScheduler, {"use_karras_sigmas": True}),
    "euler-a": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp-2m": (DPMSolverMultistepScheduler, {}),
    "dpmpp-2m-karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
}


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    """sdlearn's random pipeline and diffusers' pipelines loaded from its
    save_pretrained folder (text to image and img2img share the parts)."""
    from diffusers import StableDiffusionImg2ImgPipeline
    from diffusers import StableDiffusionPipeline as DiffusersPipeline

    ours = random_pipeline()
    folder = tmp_path_factory.mktemp("pipe")
    save_pretrained(ours, folder)
    theirs = DiffusersPipeline.from_pretrained(folder)
    theirs.set_progress_bar_config(disable=True)
    img2img = StableDiffusionImg2ImgPipeline(**theirs.components)
    img2img.set_progress_bar_config(disable=True)
    return ours, theirs, img2img


@needs_diffusers
@pytest.mark.parametrize("name", list(PIPELINE_SAMPLERS))
# diffusers warns that one image for two prompts is deprecated; sdlearn spreads it
@pytest.mark.filterwarnings("ignore:You have passed 2 text prompts")
def test_pipeline_with_each_sampler_matches_diffusers(pipelines, name):
    from PIL import Image

    ours, theirs, img2img = pipelines
    cls, settings = PIPELINE_SAMPLERS[name]
    ours.scheduler = cls(**settings)
    theirs.scheduler = img2img.scheduler = ours.scheduler.to_diffusers()
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    kwargs = dict(num_inference_steps=8, guidance_scale=7.5, output_type="np")
    for extra in ({"latents": latents}, {"image": START, "strength": 0.6}):
        seeded = torch.Generator().manual_seed(0)
        mine = ours(PROMPTS, generator=seeded, **kwargs, **extra).images
        seeded = torch.Generator().manual_seed(0)
        if "image" in extra:
            extra = {**extra, "image": Image.fromarray(START)}
            ref = img2img(PROMPTS, generator=seeded, **kwargs, **extra).images
        else:
            ref = theirs(
                PROMPTS, height=SIZE, width=SIZE, generator=seeded, **kwargs, **extra
            ).images
        assert np.abs(mine - ref).max() <= 1e-4, f"{name}, {sorted(extra)}"


@pytest.mark.parametrize("name", list(PIPELINE_SAMPLERS))
def test_inpainting_keeps_the_unmasked_image_with_each_sampler(name):
    from sdlearn.images import to_pixels

    pipe = random_pipeline()
    cls, settings = PIPELINE_SAMPLERS[name]
    pipe.scheduler = cls(**settings)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[:, : SIZE // 2] = 255  # repaint the left half
    out = pipe(
        "a blue square",
        image=START,
        mask_image=mask,
        num_inference_steps=6,
        strength=0.7,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    ).images
    known = pipe.encode_image(to_pixels(START), torch.Generator().manual_seed(0))
    torch.testing.assert_close(out[..., 4:], known[..., 4:])
    assert (out[..., :4] - known[..., :4]).abs().max() > 0.1


# DDIM inversion: image -> noise -> the same image


def test_ddim_inversion_round_trip_returns_the_start():
    """On the shipped model: invert 4 training images' latents, sample back
    with DDIM at eta 0, and land within the stated tolerance of the start."""
    from sdlearn.shapes import ShapesDataset

    pipe = from_pretrained()
    pipe.progress = False
    pipe.scheduler = scheduler_from_config(
        {**scheduler_to_config(pipe.scheduler), "_class_name": "DDIMScheduler"}
    )
    data = ShapesDataset(split="train", length=4, seed=3)
    pixels = torch.stack([data[i]["pixel_values"] for i in range(4)])
    captions = [data[i]["caption"] for i in range(4)]
    latents = pipe.vae.encode(pixels).mean * pipe.vae.config.scaling_factor
    errors = []
    for iterations in (0, 3):
        noise = invert(
            pipe,
            latents,
            captions,
            num_inference_steps=10,
            fixed_point_iterations=iterations,
        )
        back = pipe(
            captions,
            latents=noise,
            num_inference_steps=10,
            guidance_scale=1.0,
            output_type="latent",
        ).images
        errors.append((back - latents).abs())
    # plain inversion asks the model at the wrong point, so 10 steps miss by a
    # few percent of the latents' spread (std about 1); three fixed-point
    # iterations per step make each step DDIM's exact inverse up to 0.1
    assert errors[0].mean() < 0.1
    torch.testing.assert_close(back, latents, rtol=0, atol=0.1)
    assert errors[1].mean() < errors[0].mean() / 3


def test_invert_refuses_bad_input():
    pipe = random_pipeline()
    with pytest.raises(ValueError, match=r"shape \(B, 4, h, w\), got \(1, 3, 2, 2\)"):
        invert(pipe, torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError, match="one prompt or one per latent"):
        invert(pipe, torch.zeros(3, 4, 2, 2), ["a", "b"])


# --- DDIM ----------------------------------------------------------------------

# (settings, steps, eta): spacings, step counts, eta, prediction types, the last
# step's alpha_bar and clipping
DDIM_CASES = {
    "sd15-50": ({}, 50, 0.0),
    "sd15-eta1": ({}, 20, 1.0),
    "trailing-eta-half": ({"timestep_spacing": "trailing"}, 10, 0.5),
    "linspace-v": (
        {"timestep_spacing": "linspace", "prediction_type": "v_prediction"},
        7,
        0.3,
    ),
    "sample-alpha-one-clip": (
        {
            "prediction_type": "sample",
            "set_alpha_to_one": True,
            "clip_sample": True,
            "steps_offset": 0,
            "beta_schedule": "linear",
            "beta_start": 1e-4,
            "beta_end": 0.02,
        },
        25,
        1.0,
    ),
    "cosine": ({"beta_schedule": "squaredcos_cap_v2"}, 15, 0.0),
}


@needs_diffusers
@pytest.mark.parametrize("name", list(DDIM_CASES))
def test_ddim_sampling_loop_matches_diffusers(name):
    settings, steps, eta = DDIM_CASES[name]
    ours = DDIMScheduler(**settings)
    theirs = ours.to_diffusers()
    torch.testing.assert_close(ours.timesteps, theirs.timesteps)  # before set_timesteps
    for actual, expected in zip(
        sample_loop(ours, steps, eta=eta),
        sample_loop(theirs, steps, eta=eta),
        strict=True,
    ):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.timesteps, theirs.timesteps)


@needs_diffusers
def test_ddim_from_diffusers_and_config_round_trip():
    from diffusers import DDIMScheduler as DiffusersDDIM

    theirs = DiffusersDDIM(beta_schedule="scaled_linear", timestep_spacing="trailing")
    ours = DDIMScheduler.from_diffusers(theirs)
    assert ours.config.timestep_spacing == "trailing"
    assert ours.config.set_alpha_to_one  # diffusers' default, kept
    again = scheduler_from_config({"_class_name": "DDIMScheduler", **theirs.config})
    assert isinstance(again, DDIMScheduler) and again.config == ours.config


def test_ddim_eta_zero_is_deterministic_and_eta_adds_noise():
    a = sample_loop(DDIMScheduler(), 10, eta=0.0)
    b = sample_loop(DDIMScheduler(), 10, eta=0.0)
    torch.testing.assert_close(a[-2], b[-2], rtol=0, atol=0)
    noisy = sample_loop(DDIMScheduler(), 10, eta=1.0)
    assert (noisy[-2] - a[-2]).abs().max() > 1e-2


def test_ddim_bad_input_raises_value_error():
    scheduler = DDIMScheduler()
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(x, 999, x)
    scheduler.set_timesteps(10)
    with pytest.raises(ValueError, match="eta >= 0"):
        scheduler.step(x, 901, x, eta=-1)
    with pytest.raises(ValueError, match=r"shape \(1, 4, 2, 2\)"):
        scheduler.step(torch.zeros(1, 3, 2, 2), 901, x)
    with pytest.raises(ValueError, match="unknown prediction_type"):
        DDIMScheduler(prediction_type="noise")


@needs_diffusers
def test_pipeline_with_ddim_matches_diffusers(tmp_path):
    from diffusers import DDIMScheduler as DiffusersDDIM
    from diffusers import StableDiffusionPipeline as DiffusersPipeline

    ours = random_pipeline()
    ours.scheduler = DDIMScheduler()
    save_pretrained(ours, tmp_path)
    theirs = DiffusersPipeline.from_pretrained(tmp_path)
    assert isinstance(theirs.scheduler, DiffusersDDIM)
    theirs.set_progress_bar_config(disable=True)
    assert isinstance(from_pretrained(tmp_path).scheduler, DDIMScheduler)
    for eta in (0.0, 0.7):  # eta > 0 draws the step noise from the generator too
        kwargs = dict(
            num_inference_steps=8, guidance_scale=7.5, output_type="np", eta=eta
        )
        mine = ours(PROMPTS, generator=torch.Generator().manual_seed(0), **kwargs)
        ref = theirs(
            PROMPTS,
            height=SIZE,
            width=SIZE,
            generator=torch.Generator().manual_seed(0),
            **kwargs,
        ).images
        assert np.abs(mine.images - ref).max() <= 1e-4, eta


def test_eta_needs_a_scheduler_that_takes_it():
    pipe = random_pipeline()
    pipe.scheduler = EulerDiscreteScheduler()
    with pytest.raises(
        ValueError, match="eta=0.5 needs a scheduler whose step takes eta"
    ):
        pipe("a red circle", num_inference_steps=2, eta=0.5)


@pytest.mark.parametrize(
    ("cls", "sampler", "steps"),
    [
        (EulerDiscreteScheduler, "euler", 12),
        (EulerAncestralDiscreteScheduler, "euler_ancestral", 12),
        (DPMSolverMultistepScheduler, "dpmpp_2m", 10),
        (DPMSolverMultistepScheduler, "dpmpp_2m", 20),
    ],
)
def test_sample_sigmas_is_the_schedulers_loop(cls, sampler, steps):
    from sdlearn.schedulers.sigma_sampling import sample_sigmas

    scheduler = cls()
    expected = sample_loop(scheduler, steps)[-2]  # the last prev_sample
    sigmas = scheduler.sigmas
    timesteps = dict(zip(sigmas[:-1].tolist(), scheduler.timesteps, strict=True))

    def denoise(x, sigma):
        # the scheduler's model input is x_t = x / sqrt(sigma^2 + 1)
        eps = fake_model(x / (sigma**2 + 1) ** 0.5, timesteps[float(sigma)])
        return x - sigma * eps

    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 3, 4, 4, generator=g)
    start = noise * (
        (sigmas[0] ** 2 + 1) ** 0.5
        if sampler == "dpmpp_2m"
        else scheduler.init_noise_sigma
    )
    actual = sample_sigmas(denoise, start, sigmas, sampler, g)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def test_heun_is_second_order_and_euler_first():
    # for data N(0, I) the denoiser is exact, x / (1 + sigma^2), and the ODE's
    # solution is x(sigma) = x(sigma_max) sqrt(1 + sigma^2) / sqrt(1 + sigma_max^2)
    from sdlearn.schedulers.sigma_sampling import sample_sigmas

    def denoise(x, sigma):
        return x / (1 + sigma**2)

    start = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    start, sigma_min, sigma_max = start.double(), 0.5, 10.0
    exact = start * (1 + sigma_min**2) ** 0.5 / (1 + sigma_max**2) ** 0.5
    errors = {}
    for sampler in ("euler", "heun"):
        for steps in (10, 20):
            levels = torch.from_numpy(karras_sigmas(sigma_min, sigma_max, steps + 1))
            x = sample_sigmas(denoise, start, levels, sampler)
            errors[sampler, steps] = (x - exact).abs().max().item()
    assert 1.6 < errors["euler", 10] / errors["euler", 20] < 2.5  # error ~ h
    assert 3.2 < errors["heun", 10] / errors["heun", 20] < 5  # error ~ h^2
    assert errors["heun", 10] < errors["euler", 20]


def test_sample_sigmas_refuses_fewer_than_two_levels():
    from sdlearn.schedulers.sigma_sampling import sample_sigmas

    with pytest.raises(ValueError, match=r"sigmas of shape \(N \+ 1,\)"):
        sample_sigmas(lambda x, sigma: x, torch.zeros(1, 4, 2, 2), torch.ones(1))
