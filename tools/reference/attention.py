"""Reference tensors for sdlearn/attention.py, made with diffusers and transformers.

Three layers, each with random weights, its inputs and its output:

    self_attn.*   diffusers' Attention, self-attention (the UNet's attn1)
    cross_attn.*  diffusers' Attention, cross-attention with an additive padding
                  mask over the context tokens (the UNet's attn2)
    clip.*        transformers' CLIPAttention with the causal mask its text model
                  builds, without and with right padding

`PREFIX.weights.NAME` holds the reference library's own state dict, under its own
names (CLIP's q_proj, not to_q), so the test shows the mapping.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention as DiffusersAttention
from transformers import CLIPTextConfig
from transformers.masking_utils import create_causal_mask
from transformers.models.clip.modeling_clip import CLIPAttention

# Small on purpose: two heads whose total width (2 * 4) differs from the token
# width (12), so that mixing up heads, dim_head and query_dim shows.
QUERY_DIM = 12
CONTEXT_DIM = 10
HEADS = 2
DIM_HEAD = 4
BATCH, TOKENS, CONTEXT_TOKENS = 2, 5, 7


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Overwrite every parameter with N(0, 0.3^2) draws from a seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    return module.eval()


def _with_prefix(prefix: str, tensors: dict[str, torch.Tensor]) -> dict:
    return {f"{prefix}.{name}": tensor for name, tensor in tensors.items()}


def make() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    out: dict[str, torch.Tensor] = {}

    # diffusers, self-attention
    layer = randomize_(
        DiffusersAttention(QUERY_DIM, heads=HEADS, dim_head=DIM_HEAD), seed=1
    )
    x = torch.randn(BATCH, TOKENS, QUERY_DIM, generator=generator)
    with torch.no_grad():
        y = layer(x)
    out |= _with_prefix("self_attn.weights", layer.state_dict())
    out |= {"self_attn.hidden_states": x, "self_attn.output": y}

    # diffusers, cross-attention; its masks are additive, (B, 1, S), with
    # -10000 on padding as UNet2DConditionModel makes them from a 0/1 mask
    layer = randomize_(
        DiffusersAttention(
            QUERY_DIM, cross_attention_dim=CONTEXT_DIM, heads=HEADS, dim_head=DIM_HEAD
        ),
        seed=2,
    )
    x = torch.randn(BATCH, TOKENS, QUERY_DIM, generator=generator)
    context = torch.randn(BATCH, CONTEXT_TOKENS, CONTEXT_DIM, generator=generator)
    keep = torch.ones(BATCH, CONTEXT_TOKENS)
    keep[1, 4:] = 0
    mask = ((1 - keep) * -10000.0)[:, None, :]
    with torch.no_grad():
        y = layer(x, encoder_hidden_states=context, attention_mask=mask)
    out |= _with_prefix("cross_attn.weights", layer.state_dict())
    out |= {
        "cross_attn.hidden_states": x,
        "cross_attn.encoder_hidden_states": context,
        "cross_attn.attention_mask": mask,
        "cross_attn.output": y,
    }

    # transformers' CLIP. With the eager implementation CLIPTextTransformer
    # passes the causal mask as an additive (B, 1, T, T) float tensor made by
    # create_causal_mask; with sdpa it passes no mask and is_causal=True instead.
    config = CLIPTextConfig(
        hidden_size=QUERY_DIM,
        num_attention_heads=HEADS,
        intermediate_size=4 * QUERY_DIM,
        attn_implementation="eager",
    )
    layer = randomize_(CLIPAttention(config), seed=3)
    x = torch.randn(BATCH, TOKENS, QUERY_DIM, generator=generator)
    padding_mask = torch.ones(BATCH, TOKENS, dtype=torch.long)
    padding_mask[1, 3:] = 0  # right padding, as CLIP's tokenizer pads
    with torch.no_grad():
        causal = create_causal_mask(config, x, None, past_key_values=None)
        y = layer(x, attention_mask=causal)[0]
        causal_padded = create_causal_mask(
            config, x, padding_mask, past_key_values=None
        )
        y_padded = layer(x, attention_mask=causal_padded)[0]
    out |= _with_prefix("clip.weights", layer.state_dict())
    out |= {
        "clip.hidden_states": x,
        "clip.output": y,
        "clip.padding_mask": padding_mask,
        "clip.output_padded": y_padded,
    }
    return out
