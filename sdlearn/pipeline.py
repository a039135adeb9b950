"""Chapter 06: text to image. The parts of chapters 02-05 become Stable Diffusion.

    prompt -> tokenizer -> text encoder -> (B, 77, D) text tokens --------.
                                                                           v
    noise (B, 4, h, w) -> [UNet on both halves -> guidance -> scheduler step] x N
                                                                           |
    image <- VAE decoder <- latents / scaling_factor <---------------------'

`StableDiffusionPipeline` follows diffusers' pipeline of the same name number for
number: with the same weights, prompt, seed (or `latents`) and scheduler it
draws the same image. It also does img2img (start from a noised image instead
of pure noise), inpainting by blending latents under a mask (with the ordinary
4-channel UNet), and can record the cross-attention maps of each prompt token.

Loading and saving pipelines (diffusers folders, original single-file
checkpoints, the course's shipped tiny model) is `sdlearn.pipeline_io`; DDIM
inversion is `sdlearn.inversion`; LoRA adapters and textual inversion's tokens
load with `sdlearn.lora.load_lora` and `sdlearn.textual_inversion.load_learned_embeds`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sdlearn.attention_maps import CrossAttentionMaps
from sdlearn.clip import CLIPTextModel
from sdlearn.devices import pick_device, pick_dtype
from sdlearn.images import ImageInput, postprocess, to_mask, to_pixels
from sdlearn.schedulers.common import Scheduler
from sdlearn.tokenizer import CLIPTokenizer
from sdlearn.unet import UNet
from sdlearn.vae import AutoencoderKL

Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


# --- the three formulas the chapter's exercises build ---------------------------


def classifier_free_guidance(
    noise_uncond: torch.Tensor, noise_text: torch.Tensor, guidance_scale: float
) -> torch.Tensor:
    """Push the prediction away from the unconditional one, towards the text.

    eps = eps_uncond + s * (eps_text - eps_uncond), Ho & Salimans 2022, eq. 6
    (written with w = s - 1 there). s = 1 is the conditional prediction alone;
    s > 1 extrapolates past it.

    Args:
        noise_uncond: (B, C, h, w) the UNet's prediction for the empty (or
            negative) prompt.
        noise_text: (B, C, h, w) its prediction for the prompt.
        guidance_scale: s.

    Returns:
        (B, C, h, w) the guided prediction.
    """
    return noise_uncond + guidance_scale * (noise_text - noise_uncond)


def img2img_start(num_inference_steps: int, strength: float) -> int:
    """Index of the first timestep img2img runs, out of `num_inference_steps`.

    strength 1 runs every step (the image is noised all the way: pure
    text-to-image); strength 0.25 runs the last quarter of them, from an image
    only lightly noised. diffusers rounds the number of steps to run down.

    Args:
        num_inference_steps: the steps of the full schedule.
        strength: how much of the schedule to run, in [0, 1].

    Returns:
        t_start: run `scheduler.timesteps[t_start:]`.
    """
    steps_to_run = min(int(num_inference_steps * strength), num_inference_steps)
    return max(num_inference_steps - steps_to_run, 0)


def blend_latents(
    latents: torch.Tensor, known_latents: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Inpainting by blending: keep the known image outside the mask.

    Args:
        latents: (B, C, h, w) what the sampler made of this step.
        known_latents: (B, C, h, w) the original image's latents, noised to the
            same timestep.
        mask: (B, 1, h, w) 1 where the image is repainted, 0 where it is kept.

    Returns:
        (B, C, h, w) latents that are the sampler's inside the mask and the
        original's outside.
    """
    return (1 - mask) * known_latents + mask * latents


# --- the pipeline ------------------------------------------------------------------


@dataclass(frozen=True)
class DrawOptions:
    """How a pipeline call draws, beside its prompts: diffusers' keyword
    arguments, which `StableDiffusionPipeline.__call__` takes by name."""

    # image size in pixels, multiples of the VAE's 8; None: the UNet's
    # sample_size times 8, or the input image's
    height: int | None = None
    width: int | None = None
    # denoising steps
    num_inference_steps: int = 50
    # s of classifier-free guidance; 1 (or less) runs the conditional
    # prediction alone, one UNet pass per step
    guidance_scale: float = 7.5
    # the seed of every random draw (starting noise, the VAE's posterior
    # sample, the scheduler's noise)
    generator: torch.Generator | None = None
    # starting noise (B * num_images_per_prompt, 4, h, w) instead of drawing
    # it; text-to-image only
    latents: torch.Tensor | None = None
    # img2img: the image to start from (PIL, uint8 array (H, W, 3) or tensor
    # in [-1, 1]), and how far to noise it, in (0, 1]; 1 ignores it
    image: ImageInput | None = None
    strength: float = 0.8
    # inpainting (with `image`): white where to repaint, black where to keep
    mask_image: ImageInput | None = None
    # "pil", "np" (float (B, H, W, 3) in [0, 1]), "pt" (tensor (B, 3, H, W) in
    # [0, 1]) or "latent" (the final latents)
    output_type: str = "pil"
    # called after every step as callback(step index, timestep, latents,
    # predicted clean latents)
    callback: Callback | None = None
    # images drawn for each prompt
    num_images_per_prompt: int = 1
    # also return each token's cross-attention map
    attention_maps: bool = False
    # DDIM's noise, 0 (deterministic) to 1 (DDPM's amount); only for
    # schedulers whose `step` takes it
    eta: float = 0.0


@dataclass
class PipelineOutput:
    """What a pipeline call returns.

    Args:
        images: the images in the requested output type.
        attention_maps: with `attention_maps=True`, (B, 77, h, w) each latent
            pixel's attention over the prompt's tokens, averaged over heads,
            layers and steps.
        tokens: with `attention_maps=True`, each image's prompt as token strings,
            from <|startoftext|> to <|endoftext|>: map i belongs to token i.
    """

    images: Any
    attention_maps: torch.Tensor | None = None
    tokens: list[list[str]] | None = None


class StableDiffusionPipeline:
    """Text to image with Stable Diffusion's five parts.

    Args:
        tokenizer: text -> (B, 77) token ids.
        text_encoder: token ids -> (B, 77, D) text tokens.
        vae: images <-> latents; `vae.config.scaling_factor` scales latents.
        unet: predicts the noise in latents, given a timestep and text tokens.
        scheduler: the sampler, any of `sdlearn.schedulers` (DDPM, DDIM, Euler,
            Euler ancestral, DPM-Solver++), with diffusers' interface
            (`set_timesteps`, `timesteps`, `scale_model_input`, `step`,
            `add_noise`).
    """

    def __init__(
        self,
        tokenizer: CLIPTokenizer,
        text_encoder: CLIPTextModel,
        vae: AutoencoderKL,
        unet: UNet,
        scheduler: Scheduler,
    ) -> None:
        if unet.config.cross_attention_dim != text_encoder.config.hidden_size:
            raise ValueError(
                f"the UNet reads text tokens of width "
                f"{unet.config.cross_attention_dim}, the text encoder makes "
                f"{text_encoder.config.hidden_size}"
            )
        if unet.config.in_channels != vae.config.latent_channels:
            raise ValueError(
                f"the UNet takes {unet.config.in_channels} channels, the VAE makes "
                f"{vae.config.latent_channels}-channel latents"
            )
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.eval()
        self.vae = vae.eval()
        self.unet = unet.eval()
        self.scheduler = scheduler
        self.progress = True  # show a progress bar while sampling
        self.sources: dict[str, str] = {}  # where load_tiny took each part from

    @property
    def vae_scale_factor(self) -> int:
        """How many image pixels one latent pixel stands for, per side (8 in SD)."""
        return self.vae.config.downsampling_factor

    @property
    def device(self) -> torch.device:
        """Where the UNet's weights are, and so where sampling runs."""
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The UNet's weights' dtype: what the models compute in. The latents
        and the scheduler's arithmetic stay in float32 whatever it is."""
        return next(self.unet.parameters()).dtype

    def to(
        self,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> StableDiffusionPipeline:
        """Move the three models to `device` and/or cast their weights to
        `dtype` (float32, bfloat16 or float16); returns self."""
        device = self.device if device is None else pick_device(device)
        if dtype is not None:
            dtype = pick_dtype(dtype, device)
        for model in (self.text_encoder, self.vae, self.unet):
            model.to(device=device, dtype=dtype)
        return self

    @torch.no_grad()
    def encode_prompt(
        self, prompts: Sequence[str], num_images_per_prompt: int = 1
    ) -> torch.Tensor:
        """Text tokens for the UNet: (B * num_images_per_prompt, 77, D).

        Stable Diffusion reads the whole last hidden state, one vector per token,
        padding included (see `CLIPTextModel`).
        """
        ids = self.tokenizer(list(prompts)).to(self.device)  # (B, 77)
        embeds = self.text_encoder(ids)  # (B, 77, D)
        return embeds.repeat_interleave(num_images_per_prompt, dim=0)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        options: DrawOptions | None = None,
        **settings: Any,
    ) -> PipelineOutput:
        """Draw images for prompts.

        Args:
            prompt: one prompt or a list of B prompts.
            negative_prompt: what to steer away from, one or one per prompt;
                None means the empty prompt (plain classifier-free guidance).
            options: how to draw (`DrawOptions`); its defaults when None.
            settings: fields of `DrawOptions` to change, by name, as diffusers'
                pipeline takes them: `pipe(prompt, num_inference_steps=25)`.

        Returns:
            `PipelineOutput` with the images (and maps).
        """
        o = replace(options or DrawOptions(), **settings)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = self._negatives(negative_prompt, len(prompts))
        height, width, pixels, mask = self._check_call(prompts, o)
        n = len(prompts) * o.num_images_per_prompt
        f = self.vae_scale_factor
        shape = (n, self.unet.config.in_channels, height // f, width // f)

        # 1. text tokens; with guidance the unconditional half goes first
        text = self.encode_prompt(prompts, o.num_images_per_prompt)  # (n, 77, D)
        if o.guidance_scale > 1:
            uncond = self.encode_prompt(negatives, o.num_images_per_prompt)
            text = torch.cat([uncond, text])  # (2n, 77, D)

        # 2. the timesteps, all of them or img2img's last part
        timesteps = self._timesteps(o.num_inference_steps, o.strength, pixels)

        # 3. the starting latents
        known, noise = None, None
        if pixels is None:
            latents = self._initial_noise(shape, o.generator, o.latents)
        else:
            known, noise, latents = self._noised_image(
                pixels, n, timesteps[0], o.generator
            )
        if mask is not None:
            h, w = shape[-2:]
            mask = F.interpolate(mask, size=(h, w)).expand(n, 1, h, w)  # nearest

        # 4. denoise
        step_options = self._step_options(o.eta)
        capture = CrossAttentionMaps(self.unet, shape[-2:], keep_last=n)
        with capture if o.attention_maps else nullcontext():
            for i, t in enumerate(tqdm(timesteps, disable=not self.progress)):
                model_input = self.scheduler.scale_model_input(latents, t)
                noise_pred = self.predict_noise(model_input, t, text, o.guidance_scale)
                out = self.scheduler.step(
                    noise_pred, t, latents, generator=o.generator, **step_options
                )
                latents = out.prev_sample
                if mask is not None:
                    latents = self._keep_unmasked(
                        latents, known, noise, mask, i, timesteps
                    )
                if o.callback is not None:
                    o.callback(i, int(t), latents, out.pred_original_sample)

        # 5. decode
        result = PipelineOutput(images=latents)
        if o.attention_maps:
            result.attention_maps = capture.result()
            result.tokens = [
                self._tokens(p) for p in prompts for _ in range(o.num_images_per_prompt)
            ]
        if o.output_type != "latent":
            result.images = postprocess(self.decode_latents(latents), o.output_type)
        return result

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents, scaled as the UNet sees them, to images (B, 3, H, W) in about
        [-1, 1]: undo the scaling factor, then decode."""
        latents = latents / self.vae.config.scaling_factor
        return self.vae.decode(latents.to(self.dtype)).float()

    @torch.no_grad()
    def predict_noise(
        self,
        model_input: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        guidance_scale: float,
    ) -> torch.Tensor:
        """The UNet's prediction for `model_input`, with classifier-free guidance.

        Args:
            model_input: (B, C, h, w) latents, already scaled for the scheduler.
            timestep: the current timestep.
            text: (B, 77, D) text tokens, or (2B, 77, D) with the unconditional
                (or negative) half first when guidance_scale > 1.
            guidance_scale: s; guidance runs only for s > 1, as in diffusers.

        Returns:
            (B, C, h, w) the (guided) prediction.
        """
        # the models compute in self.dtype, the sampler in float32
        model_input, text = model_input.to(self.dtype), text.to(self.dtype)
        if guidance_scale <= 1:
            return self.unet(model_input, timestep, text).float()
        noise_pred = self.unet(torch.cat([model_input] * 2), timestep, text).float()
        noise_uncond, noise_text = noise_pred.chunk(2)
        return classifier_free_guidance(noise_uncond, noise_text, guidance_scale)

    def encode_image(
        self, pixels: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] to scaled latents: a sample of the
        VAE's posterior times the scaling factor, as diffusers' img2img does."""
        posterior = self.vae.encode(pixels.to(self.device, self.dtype))
        latents = posterior.sample(generator).float()
        return latents * self.vae.config.scaling_factor

    # the steps of __call__, each small ------------------------------------------

    def _negatives(
        self, negative_prompt: str | Sequence[str] | None, batch: int
    ) -> list[str]:
        if negative_prompt is None:
            return [""] * batch
        if isinstance(negative_prompt, str):
            return [negative_prompt] * batch
        negatives = list(negative_prompt)
        if len(negatives) != batch:
            raise ValueError(
                f"expected one negative prompt or {batch} (one per prompt), "
                f"got {len(negatives)}"
            )
        return negatives

    def _check_call(
        self, prompts: list[str], o: DrawOptions
    ) -> tuple[int, int, torch.Tensor | None, torch.Tensor | None]:
        """Every argument checked before any work; returns height, width, the
        image as pixels (or None) and the mask (or None)."""
        height, width, steps, strength = (
            o.height,
            o.width,
            o.num_inference_steps,
            o.strength,
        )
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"expected a prompt or a list of prompts, got {prompts!r}")
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"expected num_inference_steps >= 1, got {steps!r}")
        if o.num_images_per_prompt < 1:
            raise ValueError(
                f"expected num_images_per_prompt >= 1, got {o.num_images_per_prompt}"
            )
        if o.output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(
                f"expected output_type 'pil', 'np', 'pt' or 'latent', got "
                f"{o.output_type!r}"
            )
        pixels = None if o.image is None else to_pixels(o.image).to(self.device)
        if pixels is not None:
            if not 0 < strength <= 1:
                raise ValueError(f"expected strength in (0, 1], got {strength}")
            if img2img_start(steps, strength) == steps:
                raise ValueError(
                    f"strength {strength} of {steps} steps runs no "
                    f"step; raise strength or num_inference_steps"
                )
            image_h, image_w = pixels.shape[-2:]
            if (height or image_h, width or image_w) != (image_h, image_w):
                raise ValueError(
                    f"height x width {height} x {width} differ from the image's "
                    f"{image_h} x {image_w}; resize the image instead"
                )
            height, width = image_h, image_w
        mask = None
        if o.mask_image is not None:
            if pixels is None:
                raise ValueError("mask_image needs image: the picture to inpaint")
            mask = to_mask(o.mask_image).to(self.device)
            if mask.shape[-2:] != pixels.shape[-2:]:
                raise ValueError(
                    f"expected a mask of the image's size {tuple(pixels.shape[-2:])}, "
                    f"got {tuple(mask.shape[-2:])}"
                )
        default = self.unet.config.sample_size * self.vae_scale_factor
        height, width = height or default, width or default
        f = self.vae_scale_factor * self.unet.config.downsampling_factor
        if height % f or width % f or height < f or width < f:
            raise ValueError(
                f"expected height and width to be positive multiples of {f} (the "
                f"VAE's {self.vae_scale_factor} times the UNet's "
                f"{self.unet.config.downsampling_factor}), got {height} x {width}"
            )
        return height, width, pixels, mask

    def _timesteps(
        self, steps: int, strength: float, pixels: torch.Tensor | None
    ) -> torch.Tensor:
        """The scheduler's timesteps for `steps` steps, or img2img's last part
        of them (`strength`) when there is an image to start from."""
        self.scheduler.set_timesteps(steps, device=self.device)
        timesteps = self.scheduler.timesteps
        if pixels is not None:
            start = img2img_start(steps, strength)
            timesteps = timesteps[start:]
            if hasattr(self.scheduler, "set_begin_index"):
                # the sigma-space samplers count their steps: start them there
                self.scheduler.set_begin_index(start)
        return timesteps

    def _step_options(self, eta: float) -> dict[str, float]:
        """The scheduler step's keyword arguments: DDIM's eta, where it is not 0."""
        if eta and "eta" not in inspect.signature(self.scheduler.step).parameters:
            raise ValueError(
                f"eta={eta} needs a scheduler whose step takes eta (DDIM), "
                f"got {type(self.scheduler).__name__}"
            )
        return {"eta": eta} if eta else {}

    def _initial_noise(
        self,
        shape: tuple[int, ...],
        generator: torch.Generator | None,
        latents: torch.Tensor | None,
    ) -> torch.Tensor:
        """x_T: standard normal noise times the scheduler's starting sigma."""
        if latents is None:
            latents = _randn(shape, generator, self.device)
        elif tuple(latents.shape) != shape:
            raise ValueError(
                f"expected latents of shape {shape} (B * num_images_per_prompt, "
                f"C, H/{self.vae_scale_factor}, W/{self.vae_scale_factor}), "
                f"got {tuple(latents.shape)}"
            )
        return latents.to(self.device) * self.scheduler.init_noise_sigma

    def _noised_image(
        self,
        pixels: torch.Tensor,
        n: int,
        timestep: torch.Tensor,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """img2img's start: the image's latents, the noise, and the two mixed
        at the first timestep that runs (diffusers' order of random draws)."""
        known = self.encode_image(pixels, generator)  # (B_img, C, h, w)
        if n % known.shape[0]:
            raise ValueError(f"cannot spread {known.shape[0]} images over {n} outputs")
        known = known.repeat(n // known.shape[0], 1, 1, 1)  # (n, C, h, w)
        noise = _randn(known.shape, generator, self.device)
        start = timestep.reshape(1).repeat(n)
        return known, noise, self.scheduler.add_noise(known, noise, start)

    def _keep_unmasked(
        self,
        latents: torch.Tensor,
        known: torch.Tensor,
        noise: torch.Tensor,
        mask: torch.Tensor,
        i: int,
        timesteps: torch.Tensor,
    ) -> torch.Tensor:
        """Outside the mask, put back the original image, noised to the
        timestep the latents are now at (none after the last step)."""
        if i < len(timesteps) - 1:
            known = self.scheduler.add_noise(known, noise, timesteps[i + 1 : i + 2])
        return blend_latents(latents, known, mask)

    def _tokens(self, prompt: str) -> list[str]:
        ids = self.tokenizer(prompt)[0].tolist()
        end = ids.index(self.tokenizer.eos_token_id)
        return [self.tokenizer.id_to_token[i] for i in ids[: end + 1]]


def _randn(
    shape: Sequence[int], generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """Standard normal noise drawn as diffusers' `randn_tensor` draws it: on the
    generator's device (so a CPU seed gives the same numbers everywhere), then
    moved."""
    where = device if generator is None else generator.device
    return torch.randn(tuple(shape), generator=generator, device=where).to(device)
