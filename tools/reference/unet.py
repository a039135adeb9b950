"""Reference tensors for sdlearn/unet.py, made with diffusers' UNet2DConditionModel.

Two small UNets that differ in every dimension sdlearn's config has (levels,
channels, layers per block, heads, text width, transformer depth, 1x1
convolutions vs Linear projections), each with random weights, its inputs and
outputs:

    a.*  two levels, SD 1.x's layout in small: cross-attention at level 0 only,
         1x1-convolution projections, integer timesteps
    b.*  three levels with different heads per level, cross-attention at levels
         0 and 1, Linear projections (SD 2.x), two transformer blocks per
         SpatialTransformer, fractional timesteps

`PREFIX.weights.NAME` is diffusers' own state dict. `PREFIX.output` is for one
timestep per sample, `PREFIX.output_scalar` for one timestep shared by the batch.
`embedding.*` are diffusers' sinusoidal timestep embeddings with SD's settings.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.embeddings import get_timestep_embedding

BATCH = 2
LATENT_SIZE = 8

# diffusers' keyword arguments; tests/test_unet.py builds the same UNets from
# UNetConfigs written out independently
CONFIGS = {
    "a": dict(
        sample_size=LATENT_SIZE,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12,
        attention_head_dim=2,  # the number of heads, see UNetConfig.num_heads
        norm_num_groups=4,
    ),
    "b": dict(
        sample_size=LATENT_SIZE,
        block_out_channels=(8, 12, 16),
        layers_per_block=2,
        down_block_types=(
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=20,
        attention_head_dim=(2, 3, 4),
        transformer_layers_per_block=2,
        use_linear_projection=True,
        norm_num_groups=4,
    ),
}
CONTEXT_TOKENS = {"a": 5, "b": 7}


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Overwrite every parameter with N(0, 0.2^2) draws from a seeded generator.

    Norm weights and biases get random values too, so that mixing up two norms
    shows; 0.2 keeps the activations of these small nets of order 1.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
    return module.eval()


def _with_prefix(prefix: str, tensors: dict[str, torch.Tensor]) -> dict:
    return {f"{prefix}.{name}": tensor for name, tensor in tensors.items()}


def make_unet(name: str) -> UNet2DConditionModel:
    seed = {"a": 1, "b": 2}[name]
    return randomize_(UNet2DConditionModel(**CONFIGS[name]), seed=seed)


def make() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    out: dict[str, torch.Tensor] = {}
    timesteps = {
        "a": torch.tensor([3, 970]),
        "b": torch.tensor([12.5, 700.25]),
    }
    for name, config in CONFIGS.items():
        unet = make_unet(name)
        sample = torch.randn(BATCH, 4, LATENT_SIZE, LATENT_SIZE, generator=generator)
        context = torch.randn(
            BATCH,
            CONTEXT_TOKENS[name],
            config["cross_attention_dim"],
            generator=generator,
        )
        scalar = torch.tensor(421)
        with torch.no_grad():
            output = unet(sample, timesteps[name], context).sample
            output_scalar = unet(sample, scalar, context).sample
        out |= _with_prefix(f"{name}.weights", unet.state_dict())
        out |= _with_prefix(
            name,
            {
                "sample": sample,
                "timesteps": timesteps[name],
                "timestep_scalar": scalar,
                "encoder_hidden_states": context,
                "output": output,
                "output_scalar": output_scalar,
            },
        )

    # Stable Diffusion's settings: cosines first, no frequency shift; an odd
    # width gets a zero column
    t = torch.tensor([0, 1, 17, 500, 999])
    out["embedding.timesteps"] = t
    out["embedding.dim32"] = get_timestep_embedding(t, 32, True, 0)
    out["embedding.dim9"] = get_timestep_embedding(t, 9, True, 0)
    return out
