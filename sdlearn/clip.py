"""Chapter 03: CLIP's text encoder, and a tiny contrastive CLIP for the shapes.

Stable Diffusion 1.x reads a prompt through the text tower of OpenAI's CLIP
ViT-L/14 (Radford et al. 2021): token ids (B, 77) -> one vector per token
(B, 77, 768), which the UNet attends to. `CLIPTextModel` is that encoder,
a GPT-style transformer: token and position embeddings, pre-LayerNorm blocks
with causal self-attention and quick-GELU MLPs, a final LayerNorm. Its weight
names follow transformers' `CLIPTextModel` except for the attention projections,
which use sdlearn's (diffusers') `to_q`, `to_k`, `to_v`, `to_out.0`; the table is
in `sdlearn/interop/clip.py`.

CLIP learns by contrast: in a batch of B image-caption pairs, each image should
be most similar to its own caption and each caption to its own image.
`ContrastiveCLIP` trains a small CNN and the tiny text encoder this way on the
course's shapes, and `zero_shot_classify` then names a picture by the prompt it
is most similar to.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sdlearn.attention import Attention
from sdlearn.shapes import COLORS, SHAPES, ShapesDataset, with_articles
from sdlearn.weights import SHIPPED_DIR, config_from_json, load_checked, read_shipped


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU approximated as x * sigmoid(1.702 x) (Hendrycks & Gimpel 2016, sec. 2).

    OpenAI trained CLIP with this cheaper form, so its weights only give CLIP's
    numbers with it: the exact GELU differs by up to 0.02 per activation.
    """
    return x * torch.sigmoid(1.702 * x)


# hidden_act names, as in transformers' configs ("gelu" is the exact, erf form)
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "quick_gelu": quick_gelu,
    "gelu": F.gelu,
}


@dataclass(frozen=True)
class CLIPTextConfig:
    """The shape of a CLIP text encoder; field names follow transformers'."""

    # number of token ids; CLIP's BPE vocabulary has 49408 (see tokenizer.py)
    vocab_size: int = 49408
    # longest sequence T: one learned position embedding per position
    max_position_embeddings: int = 77
    # width D of every token's vector
    hidden_size: int = 768
    # hidden width of each block's MLP, usually 4 * D
    intermediate_size: int = 3072
    # number of transformer blocks
    num_hidden_layers: int = 12
    # attention heads nh per block; head width hd = D / nh
    num_attention_heads: int = 12
    # epsilon of every LayerNorm
    layer_norm_eps: float = 1e-5
    # the MLP's activation, a key of ACTIVATIONS
    hidden_act: str = "quick_gelu"
    # the id of <|endoftext|>: the pooled output is the hidden state at the first
    # one. The encoder needs no other special id; the tokenizer knows them.
    eos_token_id: int = 49407

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size {self.hidden_size} must be divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"unknown hidden_act {self.hidden_act!r}; expected one of "
                f"{tuple(ACTIVATIONS)}"
            )

    @classmethod
    def sd15(cls) -> CLIPTextConfig:
        """The text encoder of Stable Diffusion 1.x: CLIP ViT-L/14's text tower.

        openai/clip-vit-large-patch14, 123,060,480 parameters.
        """
        return cls()

    @classmethod
    def tiny(cls) -> CLIPTextConfig:
        """The course's text encoder for the shapes captions (chapters 03 and 07).

        Same vocabulary and 77 positions as SD's, so the real tokenizer and
        pipeline code work unchanged. The token embedding, 49408 x 64 = 3.2M
        parameters, is 95% of the model: the blocks have about 50k each. Captions
        use a few dozen distinct tokens, so almost all of its rows never train.
        """
        return cls(
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=3,
            num_attention_heads=4,
        )


class CLIPMLP(nn.Module):
    """The position-wise MLP of a block: D -> intermediate_size -> D."""

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.activation = ACTIVATIONS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, T, D)"""
        x = self.activation(self.fc1(x))  # (B, T, intermediate_size)
        return self.fc2(x)  # (B, T, D)


class CLIPEncoderLayer(nn.Module):
    """One pre-LayerNorm transformer block with causal self-attention.

    x + attention(LayerNorm(x)), then x + MLP(LayerNorm(x)): normalising the
    input of each branch, not the sum, keeps a clean residual path through the
    whole stack (the GPT-2 arrangement, which CLIP's text encoder copies).
    """

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        D, nh = config.hidden_size, config.num_attention_heads
        self.layer_norm1 = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.self_attn = Attention(D, heads=nh, dim_head=D // nh, bias=True)
        self.layer_norm2 = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)

    def forward(
        self, x: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, T, D) -> (B, T, D); attention_mask is (B, T) bool, True = a token."""
        # CLIP's text transformer was trained with a causal mask, like a language
        # model (Radford et al. 2021, sec. 2.4), so token i sees tokens 0..i only
        x = x + self.self_attn(
            self.layer_norm1(x), attention_mask=attention_mask, causal=True
        )
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextModel(nn.Module):
    """CLIP's text encoder: token ids -> one vector per token.

    Stable Diffusion 1.x conditions its UNet on the whole last hidden state, all
    77 vectors after the final LayerNorm, not on the pooled vector that CLIP
    itself compares with images: per-token vectors let each part of the image
    attend to the words about it.

    Args:
        config: the sizes; `CLIPTextConfig.sd15()` or `.tiny()`.
    """

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.config = config
        D = config.hidden_size
        # dicts only so that the weights are named embeddings.token_embedding.*
        # and encoder.layers.i.* as in transformers
        self.embeddings = nn.ModuleDict(
            {
                "token_embedding": nn.Embedding(config.vocab_size, D),
                "position_embedding": nn.Embedding(config.max_position_embeddings, D),
            }
        )
        layers = nn.ModuleList()
        for _ in range(config.num_hidden_layers):
            layers.append(CLIPEncoderLayer(config))
        self.encoder = nn.ModuleDict({"layers": layers})
        self.final_layer_norm = nn.LayerNorm(D, eps=config.layer_norm_eps)
        # OpenAI's CLIP starts from small embeddings rather than torch's N(0, 1);
        # it matters only when training from scratch, as chapter 03 does
        nn.init.normal_(self.embeddings.token_embedding.weight, std=0.02)
        nn.init.normal_(self.embeddings.position_embedding.weight, std=0.01)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Encode token ids.

        Args:
            input_ids: (B, T) integer ids in [0, vocab_size), T <= 77, as
                `CLIPTokenizer` makes them.
            attention_mask: optional (B, T), 1 or True for a token and 0 or False
                for padding, as transformers takes it. Stable Diffusion passes
                none: with right padding and the causal mask, tokens up to the
                first <|endoftext|> never see the padding anyway.

        Returns:
            last_hidden_state: (B, T, D).
        """
        self._check_inputs(input_ids, attention_mask)
        T = input_ids.shape[1]
        if attention_mask is not None:
            attention_mask = attention_mask.bool()

        # 1. each token's vector plus its position's vector
        positions = torch.arange(T, device=input_ids.device)
        x = self.embeddings.token_embedding(input_ids)  # (B, T, D)
        x = x + self.embeddings.position_embedding(positions)

        # 2. the transformer blocks
        for layer in self.encoder.layers:
            x = layer(x, attention_mask)

        # 3. pre-LN blocks add to x without normalising it: normalise once at the end
        return self.final_layer_norm(x)

    def resize_token_embeddings(self, num_tokens: int) -> nn.Embedding:
        """Grow (or shrink) the token embedding to `num_tokens` rows, as
        transformers' method of the same name: for tokens added to the
        tokenizer. Kept rows are copied; new rows start at the mean row.

        Returns:
            the new embedding.
        """
        old = self.embeddings.token_embedding
        if num_tokens < 1:
            raise ValueError(f"expected a positive number of tokens, got {num_tokens}")
        weight = old.weight.detach()
        table = weight.mean(0, keepdim=True).repeat(num_tokens, 1)  # (V', D)
        keep = min(num_tokens, old.num_embeddings)
        table[:keep] = weight[:keep]
        new = nn.Embedding(num_tokens, weight.shape[1], device=weight.device)
        with torch.no_grad():
            new.weight.copy_(table)
        new.weight.requires_grad_(old.weight.requires_grad)
        self.embeddings["token_embedding"] = new
        self.config = replace(self.config, vocab_size=num_tokens)
        return new

    def pooled(
        self, input_ids: torch.Tensor, last_hidden_state: torch.Tensor
    ) -> torch.Tensor:
        """One vector per prompt: the hidden state at its first <|endoftext|>.

        Under the causal mask the end token is the first to have seen the whole
        prompt, so CLIP trained its projection (and its image matching) on it.
        Computed as transformers does: a row without the end token gives its
        first position.

        Args:
            input_ids: (B, T) the ids that were encoded.
            last_hidden_state: (B, T, D) what `forward` returned for them.

        Returns:
            pooled_output: (B, D).
        """
        if input_ids.ndim != 2 or last_hidden_state.shape[:2] != input_ids.shape:
            raise ValueError(
                f"expected input_ids (B, T) and last_hidden_state (B, T, D), got "
                f"{tuple(input_ids.shape)} and {tuple(last_hidden_state.shape)}"
            )
        is_eos = input_ids == self.config.eos_token_id  # (B, T)
        eos_index = is_eos.int().argmax(dim=-1)  # (B,) first True, or 0 if none
        batch_index = torch.arange(input_ids.shape[0], device=input_ids.device)
        return last_hidden_state[batch_index, eos_index]  # (B, D)

    def _check_inputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> None:
        if input_ids.ndim != 2:
            raise ValueError(
                f"expected input_ids of shape (B, T), got {tuple(input_ids.shape)}"
            )
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise ValueError(f"expected integer token ids, got {input_ids.dtype}")
        B, T = input_ids.shape
        T_max = self.config.max_position_embeddings
        if not 1 <= T <= T_max:
            raise ValueError(
                f"expected 1 to {T_max} tokens (one position embedding each), "
                f"got input_ids of shape {tuple(input_ids.shape)}"
            )
        lowest, highest = input_ids.min().item(), input_ids.max().item()
        if lowest < 0 or highest >= self.config.vocab_size:
            raise ValueError(
                f"expected token ids in [0, {self.config.vocab_size}), got ids from "
                f"{lowest} to {highest}"
            )
        if attention_mask is not None and attention_mask.shape != (B, T):
            raise ValueError(
                f"expected attention_mask of shape (B, T) = {(B, T)}, "
                f"got {tuple(attention_mask.shape)}"
            )


# --- the tiny contrastive CLIP ----------------------------------------------


@dataclass(frozen=True)
class ContrastiveCLIPConfig:
    """The shape of `ContrastiveCLIP`; names follow transformers' CLIPConfig."""

    # the text tower
    text_config: CLIPTextConfig = field(default_factory=CLIPTextConfig.tiny)
    # output channels of the image tower's convolutions, each halving H and W
    image_channels: tuple[int, ...] = (32, 64, 128, 128)
    # width E of the shared embedding space where images and texts are compared
    projection_dim: int = 64
    # the learnable temperature starts at 1/0.07, as in CLIP (sec. 2.5), stored
    # as its log so that it stays positive
    logit_scale_init_value: float = math.log(1 / 0.07)
    # CLIP clips the temperature at 100 to keep training stable (sec. 2.5)
    logit_scale_max: float = 100.0

    @classmethod
    def tiny(cls) -> ContrastiveCLIPConfig:
        """The chapter 03 model for 64x64 shapes images."""
        return cls()


class ShapesImageEncoder(nn.Module):
    """A small CNN: (B, 3, H, W) images -> (B, C) vectors.

    Stride-2 3x3 convolutions, each halving H and W, with GroupNorm and SiLU
    before every convolution but the first, as in the VAE's blocks; then the
    average over the remaining positions. The last operation before the
    average is a convolution, not a norm: GroupNorm makes each group's mean
    zero, and the average would then lose what the channels found.

    Args:
        channels: output channels of each convolution; 64x64 images end as a
            4x4 map of channels[-1] channels after four.
        groups: GroupNorm groups; every entry of channels but the last must be
            divisible by it.
    """

    def __init__(self, channels: Sequence[int], groups: int = 8) -> None:
        super().__init__()
        layers = [nn.Conv2d(3, channels[0], 3, stride=2, padding=1)]
        for in_channels, out_channels in zip(channels[:-1], channels[1:], strict=True):
            layers.append(nn.GroupNorm(groups, in_channels))
            layers.append(nn.SiLU())
            layers.append(nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1))
        self.layers = nn.Sequential(*layers)
        self.out_channels = channels[-1]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, C)"""
        x = self.layers(pixels)  # (B, C, H / 2^n, W / 2^n) after n convolutions
        return x.mean(dim=(2, 3))  # (B, C)


class ContrastiveCLIP(nn.Module):
    """CLIP (Radford et al. 2021) in miniature: images and captions in one space.

    Each tower ends in a linear projection to E dimensions and an L2
    normalisation, so that a dot product is a cosine similarity; the logits are
    the similarities times a learned temperature.

    Args:
        config: the sizes; `ContrastiveCLIPConfig.tiny()`.
    """

    def __init__(self, config: ContrastiveCLIPConfig) -> None:
        super().__init__()
        self.config = config
        E = config.projection_dim
        self.vision_model = ShapesImageEncoder(config.image_channels)
        self.text_model = CLIPTextModel(config.text_config)
        self.visual_projection = nn.Linear(self.vision_model.out_channels, E, False)
        self.text_projection = nn.Linear(config.text_config.hidden_size, E, False)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Embed images.

        Args:
            pixels: (B, 3, H, W) in [-1, 1].

        Returns:
            image_embeds: (B, E), each of unit length.
        """
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(
                f"expected pixels of shape (B, 3, H, W), got {tuple(pixels.shape)}"
            )
        features = self.vision_model(pixels)  # (B, C)
        return F.normalize(self.visual_projection(features), dim=-1)  # (B, E)

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Embed token ids.

        Args:
            input_ids: (B, T) from `CLIPTokenizer`.

        Returns:
            text_embeds: (B, E), each of unit length.
        """
        if input_ids.ndim != 2:
            raise ValueError(
                f"expected input_ids of shape (B, T), got {tuple(input_ids.shape)}"
            )
        # Under the causal mask, tokens after a row's first <|endoftext|> cannot
        # change its pooled vector, so they are cut: a shapes caption needs about
        # 12 of the 77 positions.
        is_eos = input_ids == self.text_model.config.eos_token_id  # (B, T)
        T = int(is_eos.int().argmax(dim=-1).max()) + 1
        input_ids = input_ids[:, :T]  # (B, T) with the shorter T
        last_hidden_state = self.text_model(input_ids)  # (B, T, D)
        pooled = self.text_model.pooled(input_ids, last_hidden_state)  # (B, D)
        return F.normalize(self.text_projection(pooled), dim=-1)  # (B, E)

    def scale(self) -> torch.Tensor:
        """The temperature exp(logit_scale), clipped at `logit_scale_max`.

        Clipped in the forward pass, so the stored parameter may grow past it
        but the logits never do (and its gradient is then zero).
        """
        log_max = math.log(self.config.logit_scale_max)
        return self.logit_scale.clamp(max=log_max).exp()

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Similarity of every image with every caption in the batch.

        Args:
            pixels: (B, 3, H, W) images.
            input_ids: (B, T) their captions' ids; caption i describes image i.

        Returns:
            logits_per_image: (B, B), row i = image i against every caption;
                its transpose is logits_per_text.
        """
        if pixels.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"expected as many captions as images, got pixels "
                f"{tuple(pixels.shape)} and input_ids {tuple(input_ids.shape)}"
            )
        image_embeds = self.encode_image(pixels)  # (B, E)
        text_embeds = self.encode_text(input_ids)  # (B, E)
        return self.scale() * image_embeds @ text_embeds.T  # (B, B)


def clip_loss(logits_per_image: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric contrastive (InfoNCE) loss.

    Each image should pick its own caption out of the B captions (cross-entropy
    over a row), and each caption its own image (over a column); the pair i is
    the right answer, so the targets are 0, 1, ..., B-1. With uninformative
    logits the loss is log(B).

    Args:
        logits_per_image: (B, B), matched pairs on the diagonal.

    Returns:
        the mean of the two cross-entropies, a scalar.
    """
    if logits_per_image.ndim != 2 or (
        logits_per_image.shape[0] != logits_per_image.shape[1]
    ):
        raise ValueError(
            f"expected square logits of shape (B, B), "
            f"got {tuple(logits_per_image.shape)}"
        )
    targets = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    image_loss = F.cross_entropy(logits_per_image, targets)  # images pick captions
    text_loss = F.cross_entropy(logits_per_image.T, targets)  # captions pick images
    return (image_loss + text_loss) / 2


@torch.no_grad()
def zero_shot_classify(
    model: ContrastiveCLIP,
    tokenizer: Callable[[Sequence[str]], torch.Tensor],
    pixels: torch.Tensor,
    prompts: Sequence[str],
) -> torch.Tensor:
    """Name each image by the prompt it is most similar to, with no training.

    Args:
        model: a trained `ContrastiveCLIP`.
        tokenizer: a `CLIPTokenizer` (prompts -> (K, 77) ids).
        pixels: (B, 3, H, W) images.
        prompts: K class descriptions, e.g. "a red circle".

    Returns:
        (B,) LongTensor: the index of the best prompt for each image.
    """
    input_ids = tokenizer(list(prompts)).to(pixels.device)  # (K, T)
    text_embeds = model.encode_text(input_ids)  # (K, E)
    image_embeds = model.encode_image(pixels)  # (B, E)
    similarity = image_embeds @ text_embeds.T  # (B, K) cosine similarities
    return similarity.argmax(dim=-1)  # (B,)


class ContrastiveLoss(nn.Module):
    """One training step's loss of `ContrastiveCLIP` on captioned images.

    Args:
        model: the model to train.
        tokenizer: turns the batch's captions into (B, 77) ids.
    """

    def __init__(self, model: ContrastiveCLIP, tokenizer: Callable) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer

    def forward(
        self, batch: dict, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """
        Args:
            batch: "pixel_values" (B, 3, H, W) and "caption" (B strings).
            generator: unused; the loss draws no noise.

        Returns:
            (loss, {"temperature": exp(logit_scale)}).
        """
        pixels = batch["pixel_values"]
        input_ids = self.tokenizer(list(batch["caption"])).to(pixels.device)
        loss = clip_loss(self.model(pixels, input_ids))
        return loss, {"temperature": self.model.scale().detach()}


def shapes_prompts() -> list[tuple[str, str, str]]:
    """(prompt, color, shape) for every colour-shape pair: "a red circle", ..."""
    pairs = [(color, shape) for color in COLORS for shape in SHAPES]
    return [(with_articles(f"a {c} {s}"), c, s) for c, s in pairs]


@torch.no_grad()
def zero_shot_accuracy(
    model: ContrastiveCLIP,
    tokenizer: Callable,
    split: str,
    n: int,
    seed: int = 123,
    classify: Callable = zero_shot_classify,
) -> float:
    """Fraction of `n` shapes images of `split` whose colour and shape the model
    names right among all colour-shape prompts (`classify` names them: chapter
    03 passes the learner's)."""
    prompts = shapes_prompts()
    data = ShapesDataset(split, length=n, image_size=64, seed=seed)
    items = [data[i] for i in range(n)]
    pixels = torch.stack([item["pixel_values"] for item in items])
    chosen = classify(model, tokenizer, pixels, [p for p, _, _ in prompts])
    right = [
        (prompts[k][1], prompts[k][2]) == (data.scene(i).color, data.scene(i).shape)
        for i, k in enumerate(chosen.tolist())
    ]
    return sum(right) / n


def contrastive_config_from_record(values: dict) -> ContrastiveCLIPConfig:
    """ContrastiveCLIPConfig from its JSON form (lists back to tuples)."""
    text = CLIPTextConfig(**values["text_config"])
    return ContrastiveCLIPConfig(**{**config_from_json(values), "text_config": text})


def pretrained_tiny_clip(folder: Path = SHIPPED_DIR) -> ContrastiveCLIP:
    """The course's tiny contrastive CLIP, trained on the shapes dataset and
    shipped in the package (`sdlearn train clip --ship`; see clip.json), or
    the one a `sdlearn train clip` run wrote to `folder`.

    Its `text_model` is the text encoder the tiny Stable Diffusion conditions on.
    """
    state_dict, record = read_shipped("clip", folder=folder)
    model = ContrastiveCLIP(contrastive_config_from_record(record["model_config"]))
    return load_checked(model, state_dict, str(folder / "clip.safetensors")).eval()
