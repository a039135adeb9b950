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

Loading and saving live in `sdlearn.weights`-backed functions at the end:
diffusers folders, original single-file checkpoints and the course's shipped
tiny model.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from sdlearn.clip import CLIPTextConfig, CLIPTextModel
from sdlearn.devices import pick_device, pick_dtype
from sdlearn.schedulers import Scheduler
from sdlearn.tokenizer import CLIPTokenizer
from sdlearn.unet import UNet, UNetConfig
from sdlearn.vae import AutoencoderKL, VAEConfig
from sdlearn.weights import SHIPPED_DIR, config_from_json

Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None]
ImageInput = Image.Image | np.ndarray | torch.Tensor


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


# --- images in and out ----------------------------------------------------------


def to_pixels(image: ImageInput) -> torch.Tensor:
    """An RGB image as (1, 3, H, W) float in [-1, 1], the VAE's input.

    Args:
        image: a PIL image, a uint8 array (H, W, 3), or a tensor (3, H, W) or
            (B, 3, H, W) already in [-1, 1].
    """
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"expected a uint8 array of shape (H, W, 3), got {image.dtype} "
                f"{image.shape}"
            )
        pixels = torch.from_numpy(image.copy()).permute(2, 0, 1).float() / 255
        return (pixels * 2 - 1)[None]  # (1, 3, H, W)
    if isinstance(image, torch.Tensor):
        if image.ndim == 3:
            image = image[None]
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(
                f"expected an image tensor of shape (3, H, W) or (B, 3, H, W) in "
                f"[-1, 1], got {tuple(image.shape)}"
            )
        return image.float()
    raise ValueError(
        f"expected a PIL image, a uint8 array or a tensor, got {type(image).__name__}"
    )


def to_mask(mask: ImageInput) -> torch.Tensor:
    """A mask as (1, 1, H, W) float: 1 (white) where to repaint, 0 where to keep.

    Grey values are rounded to 0 or 1 at 0.5, as diffusers binarises masks.

    Args:
        mask: a PIL image (any mode), an array (H, W) or (H, W, C) of uint8 or
            of floats in [0, 1], or a tensor (H, W), (1, H, W) or (B, 1, H, W)
            in [0, 1].
    """
    if isinstance(mask, Image.Image):
        mask = np.asarray(mask.convert("L"))
    if isinstance(mask, np.ndarray):
        values = mask.astype(np.float32) / (255 if mask.dtype == np.uint8 else 1)
        if values.ndim == 3:
            values = values.mean(axis=-1)
        mask = torch.from_numpy(values)
    if not isinstance(mask, torch.Tensor):
        raise ValueError(
            f"expected a mask as a PIL image, an array or a tensor, got "
            f"{type(mask).__name__}"
        )
    while mask.ndim < 4:
        mask = mask[None]
    if mask.shape[1] != 1:
        raise ValueError(
            f"expected a mask of shape (H, W) or (B, 1, H, W), got {tuple(mask.shape)}"
        )
    return (mask.float() >= 0.5).float()


def postprocess(images: torch.Tensor, output_type: str) -> Any:
    """Decoded images (B, 3, H, W) in about [-1, 1] to the output type.

    "pt": a tensor (B, 3, H, W) in [0, 1]; "np": a float array (B, H, W, 3) in
    [0, 1], as diffusers returns it; "pil": a list of PIL images.
    """
    images = (images / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return images
    array = images.detach().cpu().permute(0, 2, 3, 1).float().numpy()
    if output_type == "np":
        return array
    return [Image.fromarray(a) for a in (array * 255).round().astype(np.uint8)]


# --- looking inside: cross-attention maps ----------------------------------------


class CrossAttentionMaps:
    """Records how much each pixel of the latents attends to each prompt token.

    While active (a context manager), every cross-attention layer of the UNet
    reports softmax(QK^T / sqrt(hd)) for its pixels and the text tokens; the
    maps are averaged over heads, resized to the latents' h x w, and summed
    over layers and denoising steps. Only the conditional half of a guided batch
    is kept: the unconditional half attends to the empty prompt.

    The probabilities are computed again from the layer's own inputs (one more
    matmul per layer), so the fused attention kernel keeps running as usual.

    Args:
        unet: the UNet to watch.
        latent_size: (h, w) of the latents, to place each layer's pixels.
        keep_last: of each batch the UNet sees, keep only the last `keep_last`
            items (the conditional half under guidance); None keeps all.
    """

    def __init__(
        self, unet: UNet, latent_size: tuple[int, int], keep_last: int | None = None
    ) -> None:
        self.unet = unet
        self.latent_size = latent_size
        self.keep_last = keep_last
        self.total: torch.Tensor | None = None  # (B, S, h, w)
        self.count = 0
        self.handles: list = []

    def __enter__(self) -> CrossAttentionMaps:
        for name, module in self.unet.named_modules():
            if name.endswith("attn2"):
                self.handles.append(module.register_forward_hook(self._record))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _record(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        hidden_states, context = args[0], args[1]
        if self.keep_last is not None:
            hidden_states = hidden_states[-self.keep_last :]
            context = context[-self.keep_last :]
        B, T, _ = hidden_states.shape
        q = module.to_q(hidden_states).view(B, T, module.heads, -1)  # (B, T, nh, hd)
        k = module.to_k(context).view(B, context.shape[1], module.heads, -1)
        scores = torch.einsum("bthd,bshd->bhts", q, k) / q.shape[-1] ** 0.5
        probs = scores.float().softmax(dim=-1).mean(dim=1)  # (B, T, S)
        # this layer's pixels: T = (h / f) * (w / f) for its downsampling f
        h, w = self.latent_size
        f = round((h * w / T) ** 0.5)
        maps = probs.transpose(1, 2).reshape(B, -1, h // f, w // f)  # (B, S, h/f, w/f)
        maps = F.interpolate(maps, size=(h, w), mode="bilinear", align_corners=False)
        self.total = maps if self.total is None else self.total + maps
        self.count += 1

    def result(self) -> torch.Tensor:
        """The average map of every token: (B, S, h, w), each pixel's attention
        over the S tokens summing to 1."""
        if self.total is None:
            raise ValueError("no cross-attention was recorded; run the UNet first")
        return self.total / self.count


# --- the pipeline ------------------------------------------------------------------


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

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None) -> StableDiffusionPipeline:
        """Load a pipeline.

        Args:
            path: a diffusers-format folder (model_index.json and one subfolder
                per part), a run folder of `sdlearn train vae|clip|unet|all`
                (see `load_tiny`), or an original single-file SD 1.x checkpoint
                (.safetensors, or .ckpt read with `torch.load(weights_only=True)`
                only); None loads the course's tiny shapes model shipped in the
                package.

        Raises:
            FileNotFoundError: the path or a part of it is missing.
            ValueError: a file is corrupt or not what it claims to be.
            WeightsMismatchError: weights do not fit, naming the file and keys.
        """
        if path is None:
            return load_tiny()
        path = Path(path)
        is_run = path.is_dir() and not (path / "model_index.json").exists()
        if is_run and any(_run_part(path, name) for name in TINY_PARTS):
            return load_tiny(path)
        if path.is_dir():
            return load_diffusers_folder(path)
        if path.is_file():
            return load_single_file(path)
        raise FileNotFoundError(f"{path} does not exist")

    def save_single_file(self, path: str | Path) -> Path:
        """Write an original-layout single-file SD 1.x `.safetensors` checkpoint."""
        return save_single_file(self, path)

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write a diffusers-format folder, loadable by `from_pretrained` and by
        diffusers' `StableDiffusionPipeline.from_pretrained`."""
        return save_diffusers_folder(self, folder)

    def load_lora(self, path: str | Path, scale: float = 1.0) -> None:
        """Add the UNet adapters of a LoRA file (sdlearn's or diffusers' layout).

        Args:
            path: a .safetensors file with "unet.<module>.lora_A/B.weight" keys,
                as `sdlearn.lora.save_lora` and diffusers write them.
            scale: how much of the adapter to apply (0: none, 1: as trained).
        """
        from sdlearn.lora import load_lora

        load_lora(self.unet, path, prefix="unet", multiplier=scale)

    def load_textual_inversion(self, path: str | Path, token: str | None = None) -> str:
        """Add a learned token (textual inversion) to the tokenizer and the text
        encoder, as diffusers' method of the same name.

        Args:
            path: a .safetensors file holding {token: (1, D)}, as
                `sdlearn train textual-inversion` and diffusers' training
                script write it, or A1111's {"emb_params": (1, D)}.
            token: the word to use in prompts; the file's own by default
                (required for A1111's files).

        Returns:
            the token, e.g. "<diamond>".
        """
        from sdlearn.textual_inversion import load_learned_embeds

        return load_learned_embeds(self.tokenizer, self.text_encoder, path, token)

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
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        image: ImageInput | None = None,
        strength: float = 0.8,
        mask_image: ImageInput | None = None,
        output_type: str = "pil",
        callback: Callback | None = None,
        num_images_per_prompt: int = 1,
        attention_maps: bool = False,
        eta: float = 0.0,
    ) -> PipelineOutput:
        """Draw images for prompts.

        Args:
            prompt: one prompt or a list of B prompts.
            negative_prompt: what to steer away from, one or one per prompt;
                None means the empty prompt (plain classifier-free guidance).
            height, width: image size in pixels, multiples of the VAE's 8;
                default: the UNet's sample_size times 8, or the input image's.
            num_inference_steps: denoising steps.
            guidance_scale: s of classifier-free guidance; 1 (or less) runs the
                conditional prediction alone, one UNet pass per step.
            generator: the seed of every random draw (starting noise, the VAE's
                posterior sample, the scheduler's noise).
            latents: starting noise (B * num_images_per_prompt, 4, h, w) instead
                of drawing it; text-to-image only.
            image: img2img: the image to start from (PIL, uint8 array (H, W, 3)
                or tensor in [-1, 1]).
            strength: img2img: how far to noise `image`, in (0, 1]; 1 ignores it.
            mask_image: inpainting (with `image`): white where to repaint, black
                where to keep the image.
            output_type: "pil", "np" (float (B, H, W, 3) in [0, 1]), "pt"
                (tensor (B, 3, H, W) in [0, 1]) or "latent" (the final latents).
            callback: called after every step as callback(step index, timestep,
                latents, predicted clean latents).
            num_images_per_prompt: images drawn for each prompt.
            attention_maps: also return each token's cross-attention map.
            eta: DDIM's noise, 0 (deterministic) to 1 (DDPM's amount); only
                for schedulers whose `step` takes it.

        Returns:
            `PipelineOutput` with the images (and maps).
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = self._negatives(negative_prompt, len(prompts))
        height, width, pixels, mask = self._check_call(
            prompts,
            height,
            width,
            num_inference_steps,
            strength,
            image,
            mask_image,
            output_type,
            num_images_per_prompt,
        )
        n = len(prompts) * num_images_per_prompt
        shape = (
            n,
            self.unet.config.in_channels,
            height // self.vae_scale_factor,
            width // self.vae_scale_factor,
        )
        guided = guidance_scale > 1

        # 1. text tokens; with guidance the unconditional half goes first
        text = self.encode_prompt(prompts, num_images_per_prompt)  # (n, 77, D)
        if guided:
            uncond = self.encode_prompt(negatives, num_images_per_prompt)
            text = torch.cat([uncond, text])  # (2n, 77, D)

        # 2. the timesteps, all of them or img2img's last part
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        timesteps = self.scheduler.timesteps
        if pixels is not None:
            start = img2img_start(num_inference_steps, strength)
            timesteps = timesteps[start:]
            if hasattr(self.scheduler, "set_begin_index"):
                # the sigma-space samplers count their steps: start them there
                self.scheduler.set_begin_index(start)

        # 3. the starting latents
        known, noise = None, None
        if pixels is None:
            latents = self._initial_noise(shape, generator, latents)
        else:
            known, noise, latents = self._noised_image(
                pixels, n, timesteps[0], generator
            )
        if mask is not None:
            h, w = shape[-2:]
            mask = F.interpolate(mask, size=(h, w)).expand(n, 1, h, w)  # nearest

        # 4. denoise
        step_options = {"eta": eta} if eta else {}
        if eta and "eta" not in inspect.signature(self.scheduler.step).parameters:
            raise ValueError(
                f"eta={eta} needs a scheduler whose step takes eta (DDIM), "
                f"got {type(self.scheduler).__name__}"
            )
        capture = CrossAttentionMaps(self.unet, shape[-2:], keep_last=n)
        with capture if attention_maps else nullcontext():
            for i, t in enumerate(tqdm(timesteps, disable=not self.progress)):
                model_input = self.scheduler.scale_model_input(latents, t)
                noise_pred = self.predict_noise(model_input, t, text, guidance_scale)
                out = self.scheduler.step(
                    noise_pred, t, latents, generator=generator, **step_options
                )
                latents = out.prev_sample
                if mask is not None:
                    latents = self._keep_unmasked(
                        latents, known, noise, mask, i, timesteps
                    )
                if callback is not None:
                    callback(i, int(t), latents, out.pred_original_sample)

        # 5. decode
        result = PipelineOutput(images=latents)
        if attention_maps:
            result.attention_maps = capture.result()
            result.tokens = [
                self._tokens(p) for p in prompts for _ in range(num_images_per_prompt)
            ]
        if output_type != "latent":
            decoded = self.decode_latents(latents)
            result.images = postprocess(decoded, output_type)
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

    @torch.no_grad()
    def invert(
        self,
        latents: torch.Tensor,
        prompt: str | list[str] = "",
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        fixed_point_iterations: int = 0,
    ) -> torch.Tensor:
        """DDIM inversion: the starting noise from which DDIM (eta 0) redraws `latents`.

        Runs `DDIMInverseScheduler` on this pipeline's noise schedule, from the
        clean latents up to the noisiest timestep. Sampling with `DDIMScheduler`
        (same schedule and steps, `latents=` the result) comes back close to the
        start. Each inverse step asks the model at the timestep it lands on but
        for the sample it starts from, which sampling never does; that mismatch
        is the round trip's error. `fixed_point_iterations` re-asks the model at
        the landing point itself (x_next = step(eps(x_next)), solved by
        iteration), which makes each step the exact inverse of DDIM's.

        Args:
            latents: (B, C, h, w) clean latents, e.g. from `encode_image`.
            prompt: the prompt to invert under (one, or one per latent).
            num_inference_steps: DDIM steps; sample back with the same number.
            guidance_scale: classifier-free guidance while inverting; 1 (none)
                inverts best, since guidance bends the path.
            fixed_point_iterations: extra model calls per step to refine it.

        Returns:
            (B, C, h, w) the noise latents x_T.
        """
        from sdlearn.schedulers import DDIMInverseScheduler

        if latents.ndim != 4 or latents.shape[1] != self.unet.config.in_channels:
            raise ValueError(
                f"expected latents of shape (B, {self.unet.config.in_channels}, "
                f"h, w), got {tuple(latents.shape)}"
            )
        if fixed_point_iterations < 0:
            raise ValueError(
                f"expected fixed_point_iterations >= 0, got {fixed_point_iterations}"
            )
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if len(prompts) == 1:
            prompts = prompts * len(latents)
        if len(prompts) != len(latents):
            raise ValueError(
                f"expected one prompt or one per latent ({len(latents)}), "
                f"got {len(prompts)}"
            )
        text = self.encode_prompt(prompts, 1)
        if guidance_scale > 1:
            text = torch.cat([self.encode_prompt([""] * len(latents), 1), text])
        inverse = DDIMInverseScheduler(**inverse_settings(self.scheduler))
        inverse.set_timesteps(num_inference_steps, device=self.device)
        x = latents.to(self.device)
        for t in tqdm(inverse.timesteps, disable=not self.progress):
            x_next = inverse.step(self.predict_noise(x, t, text, guidance_scale), t, x)
            x_next = x_next.prev_sample
            for _ in range(fixed_point_iterations):
                eps = self.predict_noise(x_next, t, text, guidance_scale)
                x_next = inverse.step(eps, t, x).prev_sample
            x = x_next
        return x

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
        self,
        prompts: list[str],
        height: int | None,
        width: int | None,
        num_inference_steps: int,
        strength: float,
        image: ImageInput | None,
        mask_image: ImageInput | None,
        output_type: str,
        num_images_per_prompt: int,
    ) -> tuple[int, int, torch.Tensor | None, torch.Tensor | None]:
        """Every argument checked before any work; returns height, width, the
        image as pixels (or None) and the mask (or None)."""
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"expected a prompt or a list of prompts, got {prompts!r}")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(
                f"expected num_inference_steps >= 1, got {num_inference_steps!r}"
            )
        if num_images_per_prompt < 1:
            raise ValueError(
                f"expected num_images_per_prompt >= 1, got {num_images_per_prompt}"
            )
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(
                f"expected output_type 'pil', 'np', 'pt' or 'latent', got "
                f"{output_type!r}"
            )
        pixels = None if image is None else to_pixels(image).to(self.device)
        if pixels is not None:
            if not 0 < strength <= 1:
                raise ValueError(f"expected strength in (0, 1], got {strength}")
            if img2img_start(num_inference_steps, strength) == num_inference_steps:
                raise ValueError(
                    f"strength {strength} of {num_inference_steps} steps runs no "
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
        if mask_image is not None:
            if pixels is None:
                raise ValueError("mask_image needs image: the picture to inpaint")
            mask = to_mask(mask_image).to(self.device)
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


def inverse_settings(scheduler: Scheduler) -> dict:
    """DDIMInverseScheduler's settings for the noise schedule of `scheduler`."""
    from dataclasses import fields

    from sdlearn.schedulers import DDIMConfig, scheduler_to_config

    config = scheduler_to_config(scheduler)
    settings = {f.name: config[f.name] for f in fields(DDIMConfig) if f.name in config}
    # the inverse scheduler spaces its steps as DDIM does: leading or trailing
    if settings.get("timestep_spacing") not in ("leading", "trailing"):
        settings["timestep_spacing"] = "leading"
    return settings


def _randn(
    shape: Sequence[int], generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """Standard normal noise drawn as diffusers' `randn_tensor` draws it: on the
    generator's device (so a CPU seed gives the same numbers everywhere), then
    moved."""
    where = device if generator is None else generator.device
    return torch.randn(tuple(shape), generator=generator, device=where).to(device)


# --- loading and saving ------------------------------------------------------------

# model_index.json of a diffusers StableDiffusionPipeline: library and class of
# each part, [null, null] for the parts sdlearn does not have
_MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "DDPMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
# weight files of each part, the preferred (safetensors) first
_WEIGHT_FILES = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "text_encoder": ("model.safetensors", "pytorch_model.bin"),
}


def _read_json(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: not a diffusers pipeline folder?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None


def _read_part_weights(folder: Path, part: str) -> tuple[dict, str]:
    from sdlearn.weights import read_checkpoint_file

    for name in _WEIGHT_FILES[part]:
        path = folder / part / name
        if path.exists():
            return read_checkpoint_file(path), str(path)
    raise FileNotFoundError(
        f"no weights for {part} in {folder / part}: expected one of "
        f"{', '.join(_WEIGHT_FILES[part])}"
    )


def load_diffusers_folder(folder: str | Path) -> StableDiffusionPipeline:
    """A pipeline from a diffusers-format folder (what `save_pretrained` writes,
    and what diffusers' own `save_pretrained` writes for SD 1.x).

    Every part's weights are checked key by key and shape by shape; errors name
    the file and the keys.
    """
    from sdlearn.schedulers import scheduler_from_config
    from sdlearn.weights import load_checked

    folder = Path(folder)
    _read_json(folder / "model_index.json")
    unet = UNet(UNetConfig.from_diffusers(_read_json(folder / "unet" / "config.json")))
    vae = AutoencoderKL(
        VAEConfig.from_diffusers(_read_json(folder / "vae" / "config.json"))
    )
    text_config = _read_json(folder / "text_encoder" / "config.json")
    text_encoder = CLIPTextModel(CLIPTextConfig.from_transformers(text_config))
    for part, model in (("unet", unet), ("vae", vae)):
        state_dict, source = _read_part_weights(folder, part)
        load_checked(model, {k: v.float() for k, v in state_dict.items()}, source)
    state_dict, source = _read_part_weights(folder, "text_encoder")
    text_encoder.load_transformers_state_dict(
        {k: v.float() for k, v in state_dict.items()}, source
    )
    merges = folder / "tokenizer" / "merges.txt"
    if not merges.exists():
        raise FileNotFoundError(f"{merges} is missing: the tokenizer's BPE merges")
    tokenizer = CLIPTokenizer(merges)
    added = folder / "tokenizer" / "added_tokens.json"
    if added.exists():
        # textual inversion's tokens, in id order
        for token, i in sorted(_read_json(added).items(), key=lambda item: item[1]):
            if tokenizer.add_tokens(token) != [i]:
                raise ValueError(
                    f"{added}: expected {token!r} at id {tokenizer.vocab[token]}, "
                    f"got {i}"
                )
    scheduler = scheduler_from_config(
        _read_json(folder / "scheduler" / "scheduler_config.json")
    )
    return StableDiffusionPipeline(tokenizer, text_encoder, vae, unet, scheduler)


def save_diffusers_folder(
    pipeline: StableDiffusionPipeline, folder: str | Path
) -> Path:
    """Write the pipeline as a diffusers folder that diffusers' own
    `StableDiffusionPipeline.from_pretrained` loads (safetensors weights)."""
    from safetensors.torch import save_file

    from sdlearn.schedulers import scheduler_to_config
    from sdlearn.weights import clip_text_to_transformers

    folder = Path(folder)
    configs = {
        "unet": {
            "_class_name": "UNet2DConditionModel",
            **pipeline.unet.config.to_diffusers(),
        },
        "vae": {"_class_name": "AutoencoderKL", **pipeline.vae.config.to_diffusers()},
        "text_encoder": {
            "architectures": ["CLIPTextModel"],
            "model_type": "clip_text_model",
            **pipeline.text_encoder.config.to_transformers(),
        },
    }
    text_weights = clip_text_to_transformers(pipeline.text_encoder.state_dict())
    weights = {
        "unet": pipeline.unet.state_dict(),
        "vae": pipeline.vae.state_dict(),
        # the layout of SD 1.x's own file, which every transformers version reads
        "text_encoder": {f"text_model.{k}": v for k, v in text_weights.items()},
    }
    for part, config in configs.items():
        (folder / part).mkdir(parents=True, exist_ok=True)
        (folder / part / "config.json").write_text(json.dumps(config, indent=2))
        tensors = {k: v.detach().contiguous().cpu() for k, v in weights[part].items()}
        save_file(tensors, folder / part / _WEIGHT_FILES[part][0])
    pipeline.tokenizer.save_pretrained(folder / "tokenizer")
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(scheduler_to_config(pipeline.scheduler), indent=2)
    )
    index = {
        **_MODEL_INDEX,
        "scheduler": ["diffusers", type(pipeline.scheduler).__name__],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def _single_file_configs(path: Path) -> dict:
    """The configs sdlearn wrote into a single file's metadata, or {}."""
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as error:
        raise ValueError(
            f"{path} is not a readable safetensors file: {error}"
        ) from None
    return json.loads(metadata.get("sdlearn", "{}"))


def load_single_file(path: str | Path) -> StableDiffusionPipeline:
    """A pipeline from an original single-file SD 1.x checkpoint.

    The file holds weights only; the shapes are SD 1.x's (`UNetConfig.sd15()`,
    `VAEConfig.sd15()`, `CLIPTextConfig.sd15()`) unless sdlearn wrote the file
    and recorded its configs in the safetensors metadata. The scheduler is
    DDPM with SD 1.x's schedule, the tokenizer CLIP's.
    """
    from sdlearn.schedulers import scheduler_from_config
    from sdlearn.weights import load_original_into, read_checkpoint_file

    path = Path(path)
    configs = _single_file_configs(path)
    state_dict = read_checkpoint_file(path)  # a bad file fails before any model
    unet = UNet(
        UNetConfig(**config_from_json(configs["unet"]))
        if "unet" in configs
        else UNetConfig.sd15()
    )
    vae_config = VAEConfig.sd15()
    if "vae" in configs:
        vae_config = VAEConfig(**config_from_json(configs["vae"]))
    vae = AutoencoderKL(vae_config)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(**configs["text_encoder"])
        if "text_encoder" in configs
        else CLIPTextConfig.sd15()
    )
    load_original_into(
        path, unet=unet, vae=vae, text_encoder=text_encoder, state_dict=state_dict
    )
    scheduler = scheduler_from_config(configs.get("scheduler", {}))
    return StableDiffusionPipeline(CLIPTokenizer(), text_encoder, vae, unet, scheduler)


def save_single_file(pipeline: StableDiffusionPipeline, path: str | Path) -> Path:
    """Write the three models as one original-layout SD 1.x `.safetensors` file,
    with sdlearn's configs in its metadata so that `load_single_file` rebuilds
    models of any size (other tools ignore the metadata)."""
    from dataclasses import asdict

    from safetensors.torch import save_file

    from sdlearn.schedulers import scheduler_to_config
    from sdlearn.weights import combine_original

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"expected a path ending in .safetensors, got {path}")
    configs = {
        "unet": asdict(pipeline.unet.config),
        "vae": asdict(pipeline.vae.config),
        "text_encoder": asdict(pipeline.text_encoder.config),
        "scheduler": scheduler_to_config(pipeline.scheduler),
    }
    state_dict = combine_original(pipeline.unet, pipeline.vae, pipeline.text_encoder)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    save_file(tensors, path, metadata={"sdlearn": json.dumps(configs)})
    return path


# the parts of the tiny model, as `sdlearn train` names its stages and files
TINY_PARTS = ("vae", "clip", "unet")


def _run_part(folder: Path, name: str) -> Path | None:
    """Where a run folder keeps part NAME: the folder itself, or its NAME
    subfolder (`sdlearn train all`); None when it has no such part."""
    for candidate in (folder, folder / name):
        if (candidate / f"{name}.safetensors").is_file():
            return candidate
    return None


def tiny_part_folders(run: str | Path | None = None) -> dict[str, Path]:
    """Where each part of the tiny model comes from, for a run folder.

    The parts the run trained come from the run; a UNet's VAE and CLIP come
    from where it was trained on them (its record's `parts_dir`, relative to
    the UNet's folder), else from the package, as `sdlearn train unet` takes
    them by default.
    """
    folders = dict.fromkeys(TINY_PARTS, SHIPPED_DIR)
    if run is None:
        return folders
    run = Path(run)
    unet_folder = _run_part(run, "unet")
    if unet_folder is not None:
        folders["unet"] = unet_folder
        record = json.loads((unet_folder / "unet.json").read_text())
        if record.get("parts_dir") is not None:
            parts = unet_folder / record["parts_dir"]
            for name in ("vae", "clip"):
                found = _run_part(parts, name)
                if found is None:
                    raise FileNotFoundError(
                        f"the UNet of {unet_folder} was trained on the {name} in "
                        f"{parts}, which has no {name}.safetensors any more"
                    )
                folders[name] = found
    for name in ("vae", "clip"):
        found = _run_part(run, name)
        if found is not None:
            folders[name] = found
    return folders


def load_tiny(run: str | Path | None = None) -> StableDiffusionPipeline:
    """The course's tiny text-to-image model: the VAE of chapter 02, the text
    encoder of chapter 03's CLIP, the UNet of chapter 07, with the noise
    schedule the UNet was trained with (see data/tiny/*.json).

    Args:
        run: a folder `sdlearn train` wrote (a stage's, or `train all`'s with a
            subfolder per stage): its parts replace the shipped ones (see
            `tiny_part_folders`); None: the model shipped in the package.

    Returns:
        the pipeline; `pipeline.sources` says which folder each part came from.
    """
    from sdlearn.clip import pretrained_tiny_clip
    from sdlearn.schedulers import scheduler_from_config
    from sdlearn.weights import load_checked, read_shipped

    folders = tiny_part_folders(run)
    state_dict, record = read_shipped("unet", folder=folders["unet"])
    unet = UNet(UNetConfig(**config_from_json(record["model_config"])))
    load_checked(unet, state_dict, str(folders["unet"] / "unet.safetensors"))
    scheduler = scheduler_from_config(record.get("scheduler_config", {}))
    text_encoder = pretrained_tiny_clip(folders["clip"]).text_model
    vae = AutoencoderKL.pretrained_tiny(folders["vae"])
    pipe = StableDiffusionPipeline(CLIPTokenizer(), text_encoder, vae, unet, scheduler)
    pipe.sources = {
        name: "shipped" if folder == SHIPPED_DIR else str(folder)
        for name, folder in folders.items()
    }
    return pipe
