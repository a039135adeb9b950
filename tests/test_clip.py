"""Tests for sdlearn/clip.py: the text encoder and the tiny contrastive CLIP."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from sdlearn.attention import set_attention_backend
from sdlearn.clip import (
    CLIPTextConfig,
    CLIPTextModel,
    ContrastiveCLIP,
    ContrastiveCLIPConfig,
    clip_loss,
    quick_gelu,
    zero_shot_classify,
)
from sdlearn.interop.clip import (
    clip_text_to_transformers,
    load_transformers_weights,
    text_config_from_transformers,
    text_encoder_from_transformers,
    text_encoder_to_transformers,
)
from sdlearn.shapes import ShapesDataset
from sdlearn.tokenizer import CLIPTokenizer
from sdlearn.weights import WeightsMismatchError
from tests.helpers import load_reference, needs_transformers, randomize_

TOKEN_EMBEDDING = "embeddings.token_embedding.weight"

# Two small encoders that differ in width, depth, heads and MLP size, as
# transformers' CLIPTextConfig keyword arguments; "legacy" has SD 1.x's
# eos_token_id=2, with which transformers pools at the highest id instead.
CONFIGS = {
    "small": dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    ),
    "legacy": dict(
        hidden_size=24,
        intermediate_size=80,
        num_hidden_layers=3,
        num_attention_heads=2,
        eos_token_id=2,
    ),
}

PROMPTS = [
    "a small red circle on the left",
    "an orange square",
    "a photograph of an astronaut riding a horse on mars, highly detailed",
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer()


@pytest.fixture(scope="module")
def reference():
    return load_reference("clip")


def tiny_text_config(**changes) -> CLIPTextConfig:
    sizes = dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2
    )
    return CLIPTextConfig(**(sizes | changes))


def padding_mask(input_ids: torch.Tensor) -> torch.Tensor:
    """1 up to and including each row's first <|endoftext|>, 0 on the padding."""
    first_eos = (input_ids == 49407).int().argmax(dim=-1, keepdim=True)
    return (torch.arange(input_ids.shape[1]) <= first_eos).long()  # (B, T)


# --- configs ----------------------------------------------------------------


def test_sd15_has_the_parameter_count_of_sd_text_encoder():
    with torch.device("meta"):
        model = CLIPTextModel(CLIPTextConfig.sd15())
    assert sum(p.numel() for p in model.parameters()) == 123_060_480


def test_tiny_config_is_dominated_by_the_token_embedding():
    config = CLIPTextConfig.tiny()
    assert (config.vocab_size, config.max_position_embeddings) == (49408, 77)
    with torch.device("meta"):
        model = CLIPTextModel(config)
    total = sum(p.numel() for p in model.parameters())
    assert model.embeddings.token_embedding.weight.numel() / total > 0.9


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match=r"hidden_size 30 .* num_attention_heads 4"):
        tiny_text_config(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match=r"unknown hidden_act 'relu'.*'quick_gelu'"):
        tiny_text_config(hidden_act="relu")


def test_quick_gelu_is_x_sigmoid_1702x():
    x = torch.linspace(-4, 4, 9)
    torch.testing.assert_close(quick_gelu(x), x / (1 + torch.exp(-1.702 * x)))


# --- the encoder against reference tensors ----------------------------------


def reference_model(reference: dict, name: str) -> CLIPTextModel:
    """sdlearn's encoder with the weights stored under `name.`."""
    start = f"{name}.config."
    fields = {
        k[len(start) :]: v.item() for k, v in reference.items() if k.startswith(start)
    }
    # the stored configs use transformers' default activation
    config = text_config_from_transformers(
        SimpleNamespace(**fields, hidden_act="quick_gelu")
    )
    start = f"{name}.weights."
    weights = {k[len(start) :]: v for k, v in reference.items() if k.startswith(start)}
    # only the rows of the token embedding that the prompts use were stored
    ids = weights.pop(f"{TOKEN_EMBEDDING}.ids")
    rows = weights.pop(f"{TOKEN_EMBEDDING}.rows")
    table = torch.zeros(config.vocab_size, config.hidden_size)
    table[ids] = rows
    weights[TOKEN_EMBEDDING] = table
    return load_transformers_weights(CLIPTextModel(config), weights).eval()


@needs_transformers  # tools/reference/clip.py imports it
def test_reference_inputs_are_the_tokenizers(reference, tokenizer):
    from tools.reference.clip import PROMPTS as REFERENCE_PROMPTS

    torch.testing.assert_close(reference["input_ids"], tokenizer(REFERENCE_PROMPTS))


@pytest.mark.parametrize("backend", ["fused", "readable"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_encoder_matches_transformers_reference(reference, name, backend):
    model = set_attention_backend(reference_model(reference, name), backend)
    input_ids, mask = reference["input_ids"], reference["attention_mask"]
    with torch.no_grad():
        hidden = model(input_ids)
        hidden_masked = model(input_ids, attention_mask=mask)
    torch.testing.assert_close(hidden, reference[f"{name}.last_hidden_state"])
    torch.testing.assert_close(
        model.pooled(input_ids, hidden), reference[f"{name}.pooler_output"]
    )
    torch.testing.assert_close(
        hidden_masked, reference[f"{name}.last_hidden_state_masked"]
    )
    torch.testing.assert_close(
        model.pooled(input_ids, hidden_masked),
        reference[f"{name}.pooler_output_masked"],
    )


def test_padding_mask_changes_only_the_padding(reference):
    model = reference_model(reference, "small")
    input_ids, mask = reference["input_ids"], reference["attention_mask"]
    with torch.no_grad():
        hidden = model(input_ids)
        hidden_masked = model(input_ids, attention_mask=mask.bool())
    real = mask.bool()
    # the causal mask already keeps padding out of the tokens before it
    torch.testing.assert_close(hidden_masked[real], hidden[real])
    assert not torch.allclose(hidden_masked[~real], hidden[~real])


# --- the encoder against the live library ------------------------------------


@needs_transformers
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_encoder_matches_live_transformers(tokenizer, name, implementation):
    import transformers

    config = transformers.CLIPTextConfig(
        **CONFIGS[name], attn_implementation=implementation
    )
    theirs = randomize_(transformers.CLIPTextModel(config), seed=31, scale=0.3)
    ours = text_encoder_from_transformers(theirs)

    input_ids = tokenizer(PROMPTS)
    mask = padding_mask(input_ids)
    with torch.no_grad():
        for attention_mask in (None, mask):
            expected = theirs(input_ids, attention_mask=attention_mask)
            for backend in ("fused", "readable"):
                set_attention_backend(ours, backend)
                hidden = ours(input_ids, attention_mask=attention_mask)
                torch.testing.assert_close(hidden, expected.last_hidden_state)
                torch.testing.assert_close(
                    ours.pooled(input_ids, hidden), expected.pooler_output
                )


# --- loading and saving weights ----------------------------------------------


@needs_transformers
def test_round_trip_through_transformers_is_exact():
    import transformers

    config = transformers.CLIPTextConfig(**CONFIGS["small"])
    theirs = randomize_(transformers.CLIPTextModel(config), seed=32, scale=0.3)
    back = text_encoder_to_transformers(text_encoder_from_transformers(theirs))

    assert isinstance(back, transformers.CLIPTextModel)
    expected = theirs.state_dict()
    actual = back.state_dict()
    assert list(actual) == list(expected)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0)
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers"):
        assert getattr(back.config, field) == getattr(config, field)


def test_loads_a_checkpoint_files_layout():
    # Checkpoint files (SD 1.x's text encoder) keep transformers 4's layout:
    # keys under text_model., and the position_ids buffer
    model = randomize_(CLIPTextModel(tiny_text_config()), seed=33, scale=0.3)
    state = clip_text_to_transformers(model.state_dict())
    assert "encoder.layers.1.self_attn.out_proj.bias" in state
    checkpoint = {f"text_model.{k}": v for k, v in state.items()}
    checkpoint["text_model.embeddings.position_ids"] = torch.arange(77)[None]

    loaded = load_transformers_weights(CLIPTextModel(tiny_text_config()), checkpoint)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)


def test_mismatched_weights_name_the_keys():
    state = clip_text_to_transformers(CLIPTextModel(tiny_text_config()).state_dict())
    state.pop("encoder.layers.0.mlp.fc1.bias")
    state["encoder.layers.0.mlp.fc3.weight"] = torch.zeros(2)
    state["final_layer_norm.weight"] = torch.zeros(8)
    with pytest.raises(WeightsMismatchError) as error:
        load_transformers_weights(
            CLIPTextModel(tiny_text_config()), state, "text_encoder.safetensors"
        )
    message = str(error.value)
    assert "from text_encoder.safetensors do not fit CLIPTextModel" in message
    assert "missing keys (1):\n    encoder.layers.0.mlp.fc1.bias" in message
    assert "unexpected keys (1):\n    encoder.layers.0.mlp.fc3.weight" in message
    assert "final_layer_norm.weight: got (8,), expected (16,)" in message

    # a wider model's weights: every shape is named
    wide = clip_text_to_transformers(
        CLIPTextModel(tiny_text_config(hidden_size=32)).state_dict()
    )
    with pytest.raises(WeightsMismatchError, match=r"got \(49408, 32\), expected"):
        load_transformers_weights(CLIPTextModel(tiny_text_config()), wide)


# --- bad inputs -----------------------------------------------------------------


def test_encoder_rejects_bad_inputs():
    model = CLIPTextModel(tiny_text_config())
    ids = torch.full((2, 77), 49407)
    with pytest.raises(ValueError, match=r"input_ids of shape \(B, T\), got \(77,\)"):
        model(ids[0])
    with pytest.raises(ValueError, match=r"1 to 77 tokens .*got .*\(2, 78\)"):
        model(torch.full((2, 78), 49407))
    with pytest.raises(
        ValueError, match=r"ids in \[0, 49408\), got ids from 0 to 49408"
    ):
        model(torch.cat([ids[:, :76], torch.tensor([[0], [49408]])], dim=1))
    with pytest.raises(ValueError, match=r"ids in \[0, 49408\), got ids from -1 to"):
        model(ids - 49408)
    with pytest.raises(ValueError, match=r"integer token ids, got torch.float32"):
        model(ids.float())
    with pytest.raises(ValueError, match=r"attention_mask of shape .*\(2, 77\), got"):
        model(ids, attention_mask=torch.ones(2, 76))
    with pytest.raises(ValueError, match=r"input_ids \(B, T\) and last_hidden_state"):
        model.pooled(ids, torch.zeros(2, 76, 16))


def test_pooled_takes_the_first_end_token(tokenizer):
    model = CLIPTextModel(tiny_text_config())
    input_ids = tokenizer(["a red circle", "a"])  # end tokens at 4 and 2
    hidden = torch.randn(2, 77, 16, generator=torch.Generator().manual_seed(34))
    torch.testing.assert_close(
        model.pooled(input_ids, hidden), torch.stack([hidden[0, 4], hidden[1, 2]])
    )


# --- the contrastive model ------------------------------------------------------


@pytest.fixture(scope="module")
def contrastive():
    config = ContrastiveCLIPConfig(
        text_config=tiny_text_config(), image_channels=(8, 16), projection_dim=12
    )
    with torch.random.fork_rng():
        torch.manual_seed(35)  # torch's default initialisation draws from it
        return ContrastiveCLIP(config).eval()


def images_and_captions(tokenizer, B: int = 4):
    """B different 32x32 shapes images and their captions' ids."""
    data = ShapesDataset("train", B, image_size=32, seed=3)
    items = [data[i] for i in range(B)]
    pixels = torch.stack([item["pixel_values"] for item in items])  # (B, 3, 32, 32)
    return pixels, tokenizer([item["caption"] for item in items])


def test_contrastive_output_shapes_and_unit_embeddings(contrastive, tokenizer):
    pixels, input_ids = images_and_captions(tokenizer)
    with torch.no_grad():
        image_embeds = contrastive.encode_image(pixels)
        text_embeds = contrastive.encode_text(input_ids)
        logits = contrastive(pixels, input_ids)
    assert image_embeds.shape == text_embeds.shape == (4, 12)
    torch.testing.assert_close(image_embeds.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(text_embeds.norm(dim=-1), torch.ones(4))
    assert logits.shape == (4, 4)
    torch.testing.assert_close(logits, (1 / 0.07) * image_embeds @ text_embeds.T)


def test_encode_text_skips_the_padding_without_changing_the_result(
    contrastive, tokenizer
):
    _, input_ids = images_and_captions(tokenizer)
    with torch.no_grad():
        hidden = contrastive.text_model(input_ids)  # all 77 positions
        pooled = contrastive.text_model.pooled(input_ids, hidden)
        expected = F.normalize(contrastive.text_projection(pooled), dim=-1)
        torch.testing.assert_close(contrastive.encode_text(input_ids), expected)


def test_contrastive_rejects_bad_inputs(contrastive, tokenizer):
    pixels, input_ids = images_and_captions(tokenizer)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\), got \(4, 32, 32\)"):
        contrastive.encode_image(pixels[:, 0])
    with pytest.raises(ValueError, match=r"as many captions as images"):
        contrastive(pixels, input_ids[:3])
    with pytest.raises(ValueError, match=r"input_ids of shape \(B, T\), got \(77,\)"):
        contrastive.encode_text(input_ids[0])


def test_clip_loss_equals_a_hand_computation():
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.5, 1.0, 0.0], [0.0, -1.0, 3.0]])

    def cross_entropy(row: list[float], target: int) -> float:
        return -row[target] + math.log(sum(math.exp(x) for x in row))

    rows, columns = logits.tolist(), logits.T.tolist()
    image_loss = sum(cross_entropy(rows[i], i) for i in range(3)) / 3
    text_loss = sum(cross_entropy(columns[i], i) for i in range(3)) / 3
    expected = torch.tensor((image_loss + text_loss) / 2)
    torch.testing.assert_close(clip_loss(logits), expected)
    # the two directions differ here, so averaging both is what is checked
    assert abs(image_loss - text_loss) > 0.05

    with pytest.raises(ValueError, match=r"square logits .*got \(3, 2\)"):
        clip_loss(logits[:, :2])


def test_clip_loss_is_log_b_without_information():
    torch.testing.assert_close(clip_loss(torch.zeros(8, 8)), torch.tensor(math.log(8)))
    # random unit embeddings at temperature 1 are nearly orthogonal: cosine
    # similarities of about 1/sqrt(E) = 0.06 move the loss a little from log(B)
    g = torch.Generator().manual_seed(37)
    images = F.normalize(torch.randn(8, 256, generator=g), dim=-1)
    texts = F.normalize(torch.randn(8, 256, generator=g), dim=-1)
    loss = clip_loss(images @ texts.T)
    assert abs(loss.item() - math.log(8)) < 0.05


def test_logit_scale_starts_at_1_over_0_07_and_is_clipped_at_100(tokenizer):
    config = ContrastiveCLIPConfig(
        text_config=tiny_text_config(), image_channels=(8,), projection_dim=12
    )
    model = ContrastiveCLIP(config)
    torch.testing.assert_close(model.logit_scale, torch.tensor(math.log(1 / 0.07)))
    torch.testing.assert_close(model.scale(), torch.tensor(1 / 0.07))

    pixels, input_ids = images_and_captions(tokenizer)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))
        logits = model(pixels, input_ids)
        cosine = model.encode_image(pixels) @ model.encode_text(input_ids).T
    torch.testing.assert_close(logits, 100 * cosine)

    model.logit_scale.grad = None
    clip_loss(model(pixels, input_ids)).backward()
    # clipped: no gradient pushes it further
    torch.testing.assert_close(model.logit_scale.grad, torch.tensor(0.0))


def test_contrastive_training_learns_a_batch(tokenizer):
    config = ContrastiveCLIPConfig(
        text_config=tiny_text_config(), image_channels=(8, 16), projection_dim=12
    )
    with torch.random.fork_rng():
        torch.manual_seed(38)  # torch's default initialisation draws from it
        model = ContrastiveCLIP(config)
    pixels, input_ids = images_and_captions(tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(20):
        loss = clip_loss(model(pixels, input_ids))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # chance is log(4) = 1.39; matching 4 pairs perfectly is 0
    assert losses[-1] < 0.25 * math.log(4), losses
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_zero_shot_classify_picks_the_most_similar_prompt(tokenizer):
    # a stand-in model whose embeddings are known: prompt k -> unit vector k
    prompts = ["a red circle", "a blue square", "a green triangle"]
    rows = [tuple(row) for row in tokenizer(prompts).tolist()]
    by_prompt = dict(zip(rows, torch.eye(3), strict=True))
    images = torch.tensor([[0, 0, 1.0], [1, 0, 0], [0.3, 0.9, 0], [0, 1, 0.2]])

    def encode_text(input_ids: torch.Tensor) -> torch.Tensor:
        return torch.stack([by_prompt[tuple(row)] for row in input_ids.tolist()])

    model = SimpleNamespace(
        encode_text=encode_text, encode_image=lambda _: F.normalize(images, dim=-1)
    )
    pixels = torch.zeros(4, 3, 8, 8)
    predictions = zero_shot_classify(model, tokenizer, pixels, prompts)
    assert predictions.dtype == torch.long
    torch.testing.assert_close(predictions, torch.tensor([2, 0, 1, 1]))


def test_zero_shot_classify_runs_the_real_model(contrastive, tokenizer):
    pixels, _ = images_and_captions(tokenizer)
    prompts = ["a red circle", "a blue square", "a green triangle"]
    predictions = zero_shot_classify(contrastive, tokenizer, pixels, prompts)
    with torch.no_grad():
        text_embeds = contrastive.encode_text(tokenizer(prompts))
        similarity = contrastive.encode_image(pixels) @ text_embeds.T  # (4, 3)
    torch.testing.assert_close(predictions, similarity.argmax(dim=1))


def test_shipped_tiny_clip_names_held_out_shapes():
    from sdlearn.clip import pretrained_tiny_clip, zero_shot_accuracy
    from sdlearn.tokenizer import CLIPTokenizer
    from sdlearn.weights import read_shipped

    model = pretrained_tiny_clip()
    _, record = read_shipped("clip")
    assert record["command"].startswith("sdlearn train clip")
    assert record["train_config"]["seed"] == 0 and record["seconds"] > 0
    # other images than the ones scored at the end of training (seed 123)
    accuracy = zero_shot_accuracy(model, CLIPTokenizer(), "held_out", 256, seed=7)
    print(
        f"shipped tiny CLIP: zero-shot accuracy on held-out combinations {accuracy:.1%}"
    )
    assert accuracy >= 0.90
