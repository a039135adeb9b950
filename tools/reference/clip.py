"""Reference tensors for sdlearn/clip.py, made with transformers' CLIPTextModel.

Two small text encoders with random weights, each under its name:

    small.*   D 32, 2 layers, 4 heads, MLP 64; eos_token_id 49407, so transformers
              pools at the first <|endoftext|>
    legacy.*  D 24, 3 layers, 2 heads, MLP 80; eos_token_id 2, as in SD 1.x's
              text_encoder/config.json, so transformers pools at the highest id

For each: `NAME.config.FIELD` (transformers' config values), `NAME.weights.KEY`
(transformers' own state dict, under its names), and the outputs of the eager
implementation for `input_ids` (sdlearn's tokenizer on PROMPTS, padded with
<|endoftext|> as Stable Diffusion pads): `last_hidden_state` and `pooler_output`
without a mask, and `*_masked` with the tokenizer's padding mask.

The token embedding has 49408 rows, a few MB even at D 24, and the prompts use
a few dozen: the model's other rows are zeroed before it runs, and only the
used rows are stored, as `NAME.weights.embeddings.token_embedding.ids` and
`.rows`. The test scatters them back into a zero table: the same weights.
"""

from __future__ import annotations

import torch
from transformers import CLIPTextConfig, CLIPTextModel

from sdlearn.tokenizer import CLIPTokenizer

PROMPTS = (
    "a small red circle on the left",
    "an orange square",
    "at the top there is a large green triangle",
    "a photograph of an astronaut riding a horse on mars, highly detailed",
)

CONFIGS: dict[str, dict] = {
    "small": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
    ),
    "legacy": dict(
        hidden_size=24,
        intermediate_size=80,
        num_hidden_layers=3,
        num_attention_heads=2,
        eos_token_id=2,
    ),
}

# the config fields sdlearn reads (CLIPTextConfig.from_transformers)
FIELDS = (
    "vocab_size",
    "max_position_embeddings",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "layer_norm_eps",
    "eos_token_id",
)

TOKEN_EMBEDDING = "embeddings.token_embedding.weight"


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Overwrite every parameter with N(0, 0.3^2) draws from a seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    return module.eval()


def _scalar(value: int | float) -> torch.Tensor:
    """A config value as a 0-d tensor; floats in float64, so 1e-5 stays 1e-5."""
    dtype = torch.float64 if isinstance(value, float) else torch.long
    return torch.tensor(value, dtype=dtype)


def padding_mask(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """1 up to and including each row's first <|endoftext|>, 0 on the padding."""
    first_eos = (input_ids == eos_token_id).int().argmax(dim=-1, keepdim=True)
    positions = torch.arange(input_ids.shape[1])
    return (positions <= first_eos).long()  # (B, T)


def make() -> dict[str, torch.Tensor]:
    tokenizer = CLIPTokenizer()
    input_ids = tokenizer(list(PROMPTS))  # (B, 77)
    mask = padding_mask(input_ids, tokenizer.eos_token_id)
    used = input_ids.unique()
    out: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": mask}

    for seed, (name, kwargs) in enumerate(CONFIGS.items(), start=1):
        config = CLIPTextConfig(**kwargs, attn_implementation="eager")
        model = randomize_(CLIPTextModel(config), seed)
        table = model.get_parameter(TOKEN_EMBEDDING)
        with torch.no_grad():
            rows = table[used].clone()
            table.zero_()
            table[used] = rows
            plain = model(input_ids)
            masked = model(input_ids, attention_mask=mask)

        out |= {f"{name}.config.{f}": _scalar(getattr(config, f)) for f in FIELDS}
        weights = {k: v for k, v in model.state_dict().items() if k != TOKEN_EMBEDDING}
        out |= {f"{name}.weights.{k}": v for k, v in weights.items()}
        out[f"{name}.weights.{TOKEN_EMBEDDING}.ids"] = used.clone()
        out[f"{name}.weights.{TOKEN_EMBEDDING}.rows"] = rows
        out |= {
            f"{name}.last_hidden_state": plain.last_hidden_state,
            f"{name}.pooler_output": plain.pooler_output,
            f"{name}.last_hidden_state_masked": masked.last_hidden_state,
            f"{name}.pooler_output_masked": masked.pooler_output,
        }
    return out
