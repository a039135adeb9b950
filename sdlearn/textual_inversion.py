"""Textual inversion: teach a frozen model a new word by learning its embedding.

Gal et al. 2022 ("An Image is Worth One Word") add one token to the tokenizer,
say "<diamond>", and one row for it to the text encoder's token embedding. Every
weight of the model stays frozen except that row: D numbers (64 for the course's
text encoder, 768 for SD 1.x's). Training runs the usual diffusion loss on
captions that use the new word, and the gradient, flowing back through the frozen
UNet and text encoder, moves only the new row to wherever in the embedding space
the pictures' captions are best explained.

What it cannot do: it only finds words for what the UNet can already draw. The
UNet and the VAE never change, so a shape the UNet never learned stays out of
reach however good the word (chapter 09 measures it).

`add_token` gives a tokenizer and a text encoder the new word (initialised from a
related word, as diffusers' training script does); `NewTokenEmbedding` is the
embedding whose new rows alone train; `save_learned_embeds` writes the file
diffusers' `load_textual_inversion` reads ({token: (1, D)}) and
`load_learned_embeds` reads it (or A1111's .safetensors) back.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from sdlearn.diffusion_loss import DiffusionLoss
from sdlearn.weights import read_checkpoint_file


class NewTokenEmbedding(nn.Module):
    """A token embedding whose last `num_new` rows train and the rest stay frozen.

    Args:
        embedding: the text encoder's `nn.Embedding`, already grown to hold the
            new tokens (see `add_token`); its weights are copied.
        num_new: how many rows at the end are the new tokens'.

    `frozen` (V, D) is a buffer, not saved in checkpoints (it is the base model's)
    and never given to the optimiser; `new` (num_new, D) is the one parameter.
    """

    def __init__(self, embedding: nn.Embedding, num_new: int = 1) -> None:
        super().__init__()
        self._check_rows(embedding, num_new)
        V = embedding.num_embeddings - num_new
        weight = embedding.weight.detach()
        self.register_buffer("frozen", weight[:V].clone(), persistent=False)
        self.new = nn.Parameter(weight[V:].clone())

    @staticmethod
    def _check_rows(embedding: nn.Embedding, num_new: int) -> None:
        """Raises a ValueError unless `embedding` has more than num_new >= 1 rows."""
        if not 1 <= num_new < embedding.num_embeddings:
            raise ValueError(
                f"expected 1 to {embedding.num_embeddings - 1} new rows, got {num_new}"
            )

    @property
    def num_embeddings(self) -> int:
        """V + num_new, as `nn.Embedding.num_embeddings`."""
        return self.frozen.shape[0] + self.new.shape[0]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, D) vectors; only the new ids' vectors carry a
        gradient, and only to `new`."""
        table = torch.cat([self.frozen, self.new])  # (V + num_new, D)
        return F.embedding(input_ids, table)

    def to_embedding(self) -> nn.Embedding:
        """A plain `nn.Embedding` with the trained rows, for inference."""
        table = torch.cat([self.frozen, self.new.detach()])
        return nn.Embedding.from_pretrained(table, freeze=False)


def add_token(tokenizer, text_encoder: nn.Module, token: str, initializer: str) -> int:
    """Add `token` to the tokenizer and a row for it to the text encoder.

    Args:
        tokenizer: a `CLIPTokenizer`.
        text_encoder: a `CLIPTextModel`.
        token: the new word, e.g. "<diamond>".
        initializer: a word of the vocabulary whose embedding the new row starts
            from (e.g. "square" for a diamond); it must be a single token.

    Returns:
        the new token's id.
    """
    ids = tokenizer.encode(initializer)
    if len(ids) != 1:
        raise ValueError(
            f"expected an initializer word that is one token, got {initializer!r} "
            f"= {len(ids)} tokens {tokenizer.tokenize(initializer)}"
        )
    start = text_encoder.embeddings.token_embedding.weight[ids[0]].detach().clone()
    return _add_row(tokenizer, text_encoder, token, start)


def _add_row(tokenizer, text_encoder: nn.Module, token: str, vector) -> int:
    """The tokenizer's new word and the text encoder's new row for it; its id."""
    (token_id,) = tokenizer.add_tokens(token)
    text_encoder.resize_token_embeddings(tokenizer.vocab_size)
    with torch.no_grad():
        text_encoder.embeddings.token_embedding.weight[token_id] = vector
    return token_id


def save_learned_embeds(
    tokenizer, text_encoder: nn.Module, token: str, path: str | Path
) -> Path:
    """Write a token's learned embedding as diffusers' textual-inversion script
    does: a .safetensors file holding {token: (1, D)}."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    row = text_encoder.embeddings.token_embedding.weight[tokenizer.vocab[token]]
    save_file({token: row.detach().cpu().clone()[None]}, str(path))
    return path


def read_learned_embeds(
    path: str | Path, token: str | None = None
) -> tuple[str, torch.Tensor]:
    """The token and its (D,) embedding from a textual-inversion file.

    Reads diffusers' {token: (1, D) or (D,)} files and A1111's .safetensors
    ({"emb_params": (1, D)}, named by `token`); only one-vector embeddings.

    Raises:
        ValueError: naming the file and its keys, when it holds no single
            one-vector embedding, or an A1111 file comes without `token`.
    """
    contents = read_checkpoint_file(path)
    if "emb_params" in contents:
        if token is None:
            raise ValueError(
                f"{path} holds an A1111 embedding ('emb_params'): name its token"
            )
        name, vector = token, contents["emb_params"]
    elif len(contents) == 1:
        ((name, vector),) = contents.items()
        name = token or name
    else:
        raise ValueError(
            f"{path}: expected one token's embedding, got keys {sorted(contents)}"
        )
    if vector.dim() == 2 and vector.shape[0] == 1:
        vector = vector[0]
    if vector.dim() != 1:
        raise ValueError(
            f"{path}: expected one vector (1, D) for {name!r}, got shape "
            f"{tuple(vector.shape)} (multi-vector embeddings are not supported)"
        )
    return name, vector.float()


def load_learned_embeds(
    tokenizer, text_encoder: nn.Module, path: str | Path, token: str | None = None
) -> str:
    """Add a learned token to a tokenizer and text encoder (what
    `pipe.load_textual_inversion` does).

    Returns:
        the token, to use in prompts.
    """
    name, vector = read_learned_embeds(path, token)
    D = text_encoder.config.hidden_size
    if vector.shape != (D,):
        raise ValueError(
            f"{path}: {name!r} has a {vector.shape[0]}-wide embedding, the text "
            f"encoder's tokens are {D} wide"
        )
    _add_row(tokenizer, text_encoder, name, vector)
    return name


class TextEncoderLoss(DiffusionLoss):
    """The diffusion loss with the text encoder in the loop: the captions' token
    ids go through it every step, so the gradient reaches the new token's row
    (and, with `sdlearn.fine_tuning.fine_tune(train_text_encoder=True)`, the
    encoder's blocks).

    Args:
        text_encoder: its token embedding a `NewTokenEmbedding` (or frozen),
            the rest frozen or training.
        caption_ids: (N_captions, 77) token ids, row 0 the empty prompt.
        text_encoder_lr: the learning rate of the text encoder's trainable
            weights; the UNet's (the run's) when None.
        (the rest as for `DiffusionLoss`)
    """

    def __init__(
        self,
        unet: nn.Module,
        scheduler,
        text_encoder: nn.Module,
        caption_ids: torch.Tensor,
        scaling_factor: float,
        caption_dropout: float = 0.1,
        timestep_bias: float = 1.0,
        text_encoder_lr: float | None = None,
    ) -> None:
        super().__init__(
            unet, scheduler, caption_ids, scaling_factor, caption_dropout, timestep_bias
        )
        self.text_encoder = text_encoder
        self.text_encoder_lr = text_encoder_lr

    def param_groups(self, lr: float) -> list[dict]:
        """The optimiser's groups: the text encoder's trainable weights at
        `text_encoder_lr`, the rest (the UNet's, if any train) at `lr`."""
        text = [p for p in self.text_encoder.parameters() if p.requires_grad]
        ids = {id(p) for p in text}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        groups = [
            {"params": rest, "lr": lr},
            {"params": text, "lr": self.text_encoder_lr or lr},
        ]
        return [group for group in groups if group["params"]]

    def context(self, rows: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(self.text_tokens.to(rows.device)[rows])
