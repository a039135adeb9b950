"""Tests for sdlearn/fine_tuning.py: each of `sdlearn train lora|dreambooth|
textual-inversion` learns, writes what it learned in a form that reloads to the
trained weights, and resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from sdlearn import fine_tune_io, stages
from sdlearn.diffusion_loss import DiffusionLoss
from sdlearn.fine_tune_io import ARTIFACTS, METHODS
from sdlearn.lora import load_lora
from sdlearn.pipeline_io import from_pretrained
from sdlearn.training import TrainConfig

STEPS = TrainConfig(
    steps=24,
    batch_size=8,
    lr=5e-3,
    warmup_steps=2,
    log_every=1,
    checkpoint_every=8,
    bf16="off",
)
UNET_FILE = "diffusion_pytorch_model.safetensors"  # of a diffusers folder's unet/
# the whole UNet moves with a tenth of the adapters' rate; one 64-number row
# needs a larger one to show in 24 steps
LEARNING_RATES = {"lora": 5e-3, "dreambooth": 5e-4, "textual-inversion": 5e-2}


def run(method, out_dir, **kwargs):
    from sdlearn.fine_tuning import fine_tune

    config = STEPS.updated(lr=LEARNING_RATES[method])
    return fine_tune(
        method, config, out_dir, progress=False, eval_images=0, images=64, **kwargs
    )


def fixed_loss(pipe, token: str, concept: str = "diamond") -> float:
    """The diffusion loss on the run's training images, with the same timesteps
    and noise every time (the batch losses of so short a run are too noisy)."""
    from torch.utils.data import default_collate

    from sdlearn.fine_tuning import concept_data

    items, tokens, _ = stages.encode_shapes(
        pipe.vae,
        pipe.text_encoder,
        pipe.tokenizer,
        concept_data(concept, token, 64, seed=STEPS.seed),
        progress=False,
    )
    loss = DiffusionLoss(
        pipe.unet, pipe.scheduler, tokens, pipe.vae.config.scaling_factor, 0.0
    )
    with torch.no_grad():
        return loss(default_collate(items), torch.Generator().manual_seed(0))[0]


# LoRA learns a new word's embedding beside its adapters here (the default, the
# shape's own name, runs in the resume test); the others take their defaults
TOKENS = {"lora": "<diamond>", "dreambooth": "sks", "textual-inversion": "<diamond>"}


@pytest.mark.parametrize("method", METHODS)
def test_fine_tune_learns_and_writes_what_reloads(method, tmp_path, monkeypatch):
    from sdlearn.textual_inversion import add_token

    # --ship: into a stand-in for the package's folder
    monkeypatch.setattr(fine_tune_io, "FINE_TUNES_DIR", tmp_path / "shipped")
    token = TOKENS[method]
    options = {"token": token} if method == "lora" else {}
    record = run(method, tmp_path, prior_images=16, ship=True, **options)
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert len(lines) == 24
    saved = json.loads((tmp_path / f"{method}.json").read_text())
    assert saved == json.loads(json.dumps(record))
    assert saved["command"].startswith(f"sdlearn train {method} ")
    assert saved["command"].endswith(" --ship") and record["token"] == token
    shipped, artifact = fine_tune_io.read_fine_tune(method, "diamond")
    assert shipped == saved
    written = tmp_path / ARTIFACTS[method]
    if method == "dreambooth":  # the UNet alone, not the whole pipeline
        written = written / "unet" / "diffusion_pytorch_model.safetensors"
    assert artifact.read_bytes() == written.read_bytes()
    with pytest.raises(FileNotFoundError, match="--concept ring --ship"):
        fine_tune_io.read_fine_tune(method, "ring")

    # what was shipped holds exactly the weights the run ended with
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]
    pipe, _ = fine_tune_io.load_fine_tune(method, "diamond")
    pipe.progress = False
    new_word = token.startswith("<")
    if new_word:  # the new word's row, in the embedding file
        assert record["embedding"] == "learned_embeds.safetensors"
        (token_id,) = pipe.tokenizer.encode(token)
        row = pipe.text_encoder.embeddings.token_embedding.weight[token_id]
        trained_row = state["text_encoder.embeddings.token_embedding.new"][0]
        torch.testing.assert_close(row, trained_row, rtol=0, atol=0)
    trained = {k: v for k, v in state.items() if k.startswith("unet.")}
    if method == "lora":  # alpha = rank: B is saved as trained
        trained = {k: v for k, v in trained.items() if ".lora_" in k}
    if method != "textual-inversion":
        ours = pipe.unet.state_dict()
        assert {f"unet.{k}" for k in ours} >= set(trained)
        for key, value in trained.items():
            torch.testing.assert_close(ours[key[5:]], value, rtol=0, atol=0)
    count = sum(v.numel() for k, v in state.items() if k.endswith("embedding.new"))
    if method != "textual-inversion":
        count += sum(v.numel() for v in trained.values())
    assert record["trainable_parameters"] == count

    # and it predicts the noise of its training images better than before
    before = from_pretrained()
    if new_word:
        add_token(before.tokenizer, before.text_encoder, token, "square")
    assert fixed_loss(pipe, token) < 0.95 * fixed_loss(before, token)


def test_a_style_is_taught_like_a_shape(tmp_path):
    from sdlearn.shapes import ALL_STYLES, SHAPES

    record = run("lora", tmp_path, concept="hollow")
    assert record["concept"] == record["token"] == "hollow"
    # scored on the base shapes, hollow told from filled
    assert record["shapes_scored"] == list(SHAPES)
    assert record["styles_scored"] == list(ALL_STYLES)
    assert "--concept hollow" in record["command"]
    before = from_pretrained()
    after = from_pretrained()
    load_lora(after.unet, tmp_path / ARTIFACTS["lora"], prefix="unet")
    assert fixed_loss(after, "hollow", "hollow") < 0.95 * fixed_loss(
        before, "hollow", "hollow"
    )


def test_a_style_is_learned_from_pairs_that_differ_only_in_it():
    from sdlearn.fine_tuning import concept_data

    data = concept_data("hollow", "<hollow>", images=8, prior_images=12, seed=3)
    assert len(data) == 20
    for i in range(8):
        styled, plain = data[i], data[8 + i]
        # the same scene and caption, but hollow and named so
        assert styled["caption"].replace("<hollow> ", "") == plain["caption"]
        assert {k: styled[k] for k in ("shape", "color", "size", "position")} == {
            k: plain[k] for k in ("shape", "color", "size", "position")
        }
        drawn = (styled["pixel_values"] < 1).any(0)
        filled = (plain["pixel_values"] < 1).any(0)
        assert (drawn <= filled).all() and drawn.sum() < filled.sum()


def test_dreambooth_can_train_the_text_encoder_too(tmp_path, monkeypatch):

    monkeypatch.setattr(fine_tune_io, "FINE_TUNES_DIR", tmp_path / "shipped")
    record = run("dreambooth", tmp_path, train_text_encoder=True, ship=True)
    assert record["train_text_encoder"] is True
    assert record["text_encoder"] == fine_tune_io.TEXT_ENCODER_FILE
    assert record["command"].endswith(" --train-text-encoder --ship")
    base = from_pretrained()
    # the blocks trained, the token table did not (49408 rows, a few dozen used)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]
    encoder = {k[13:]: v for k, v in state.items() if k.startswith("text_encoder.")}
    assert "embeddings.token_embedding.weight" not in load_file(
        tmp_path / record["text_encoder"]
    )
    torch.testing.assert_close(
        encoder["embeddings.token_embedding.weight"],
        base.text_encoder.embeddings.token_embedding.weight,
        rtol=0,
        atol=0,
    )
    blocks = sum(v.numel() for k, v in encoder.items() if "token_embedding" not in k)
    unet = sum(v.numel() for k, v in state.items() if k.startswith("unet."))
    assert record["trainable_parameters"] == unet + blocks
    # the shipped pipeline: the trained UNet and text encoder, exactly
    pipe, _ = fine_tune_io.load_fine_tune("dreambooth", "diamond")
    for key, value in pipe.text_encoder.state_dict().items():
        torch.testing.assert_close(value, encoder[key], rtol=0, atol=0)
    changed = (
        encoder["final_layer_norm.weight"]
        - base.text_encoder.state_dict()["final_layer_norm.weight"]
    )
    assert changed.abs().max() > 0
    for method in ("lora", "textual-inversion"):
        with pytest.raises(ValueError, match="train_text_encoder is for dreambooth"):
            run(method, tmp_path, train_text_encoder=True)


@pytest.mark.parametrize("method", METHODS)
def test_the_text_side_can_learn_faster(method, tmp_path):
    # pivotal tuning: a new word's embedding (and the text encoder's blocks,
    # for DreamBooth) at their own learning rate, the UNet's side at the run's
    options = {"token": "<hollow>", "concept": "hollow", "text_encoder_lr": 0.02}
    if method == "dreambooth":
        options["train_text_encoder"] = True
    record = run(method, tmp_path, stop_at=1, **options)
    assert record["text_encoder_lr"] == 0.02
    assert "--text-encoder-lr 0.02" in record["command"]
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    groups = state["optimizer"]["param_groups"]
    text = 1  # the new word's row; for DreamBooth, every other text encoder tensor
    if method == "dreambooth":
        text += sum(
            k.startswith("text_encoder.") and "token_embedding" not in k
            for k in state["model"]
        )
    unet_lr = LEARNING_RATES[method]
    expected = [(0.02, text)] if method == "textual-inversion" else [None, (0.02, text)]
    if method != "textual-inversion":
        unet = sum(k.startswith("unet.") for k in state["model"])
        if method == "lora":
            unet = sum(".lora_" in k for k in state["model"])
        expected[0] = (unet_lr, unet)
    assert [(g["initial_lr"], len(g["params"])) for g in groups] == expected
    # nothing of the text encoder trains: its own rate would be ignored
    if method != "textual-inversion":
        with pytest.raises(ValueError, match="text_encoder_lr=0.02 sets the rate"):
            run(method, tmp_path / "plain", stop_at=1, text_encoder_lr=0.02)
    with pytest.raises(ValueError, match="positive text_encoder_lr, got 0"):
        run(method, tmp_path / "zero", stop_at=1, **{**options, "text_encoder_lr": 0})


def test_a_fine_tune_refuses_another_base(tmp_path, monkeypatch):

    monkeypatch.setattr(fine_tune_io, "FINE_TUNES_DIR", tmp_path / "shipped")
    record = run("lora", tmp_path / "run", ship=True)
    assert record["base"] == fine_tune_io.base_digest(from_pretrained())
    path = tmp_path / "shipped" / "lora-diamond.json"
    path.write_text(json.dumps({**record, "base": "0123456789abcdef"}))
    with pytest.raises(ValueError, match="lora-diamond was trained on another base"):
        fine_tune_io.load_fine_tune("lora", "diamond")


@pytest.mark.parametrize("method", METHODS)
def test_fine_tune_resumes_exactly(method, tmp_path):
    run(method, tmp_path / "straight")
    run(method, tmp_path / "stopped", stop_at=8)
    run(method, tmp_path / "stopped", resume=True)
    straight = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    resumed = torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=True)
    assert straight["model"].keys() == resumed["model"].keys()
    for key, value in straight["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, rtol=0, atol=0)
    # and so do the files written from them (a pipeline folder for DreamBooth)
    artifact = tmp_path / "straight" / ARTIFACTS[method]
    files = (
        [artifact] if artifact.is_file() else sorted(artifact.rglob("*.safetensors"))
    )
    for file in files:  # the tensors: safetensors may order a header's metadata
        again = load_file(
            tmp_path / "stopped" / file.relative_to(tmp_path / "straight")
        )
        expected = load_file(file)
        assert again.keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(again[key], value, rtol=0, atol=0)


def test_eval_every_scores_the_ema_along_the_run_and_keeps_the_weights(
    tmp_path, monkeypatch
):
    """--eval-every stops the run to score it (the EMA's weights when the EMA is
    on) and resumes exactly: the weights are an unstopped run's, also when the
    run itself is interrupted and resumed between two scorings."""
    from sdlearn import fine_tuning

    scored = []

    def fake_scores(pipe, prompt_sets, seeds, concept, wording=None):
        checkpoint = tmp_path / "scored" / "checkpoint.pt"
        if wording and checkpoint.exists():  # along the run, not before it
            saved = torch.load(checkpoint, weights_only=True)
            shadow = saved["ema"]["shadow"]
            for key, value in pipe.unet.state_dict().items():
                torch.testing.assert_close(value, shadow[f"unet.{key}"], rtol=0, atol=0)
            scored.append(saved["step"])
        return {f"{name} all": float(len(scored)) for name in prompt_sets}

    monkeypatch.setattr(fine_tuning, "_scores", fake_scores)
    config = STEPS.updated(lr=LEARNING_RATES["dreambooth"], ema_decay=0.9)
    options = dict(progress=False, eval_images=30, images=64)
    fine_tuning.fine_tune("dreambooth", config, tmp_path / "plain", **options)
    out = tmp_path / "scored"
    fine_tuning.fine_tune(
        "dreambooth", config, out, stop_at=12, eval_every=8, **options
    )
    record = fine_tuning.fine_tune(
        "dreambooth", config, out, resume=True, eval_every=8, **options
    )
    # scored at 8 and 16, and at the ends of both parts (12, 24) as always
    assert scored == [8, 12, 16, 24]
    assert record["scores_by_step"] == {
        "step": [8, 16],
        "diamond all": [1.0, 3.0],
        "base all": [1.0, 3.0],
    }
    assert "--eval-every 8" in record["command"]
    plain = load_file(tmp_path / "plain" / "pipeline" / "unet" / UNET_FILE)
    again = load_file(out / "pipeline" / "unet" / UNET_FILE)
    for key, value in plain.items():
        torch.testing.assert_close(again[key], value, rtol=0, atol=0)
    # a run shorter than eval_every has nothing to show along the way
    short = fine_tuning.fine_tune(
        "dreambooth", config, tmp_path / "short", eval_every=100, **options
    )
    assert short["scores_by_step"] == {"step": []}
    with pytest.raises(ValueError, match="eval_every=8 scores the run"):
        fine_tuning.fine_tune("dreambooth", config, out, eval_every=8, eval_images=0)


def test_fine_tune_refuses_unknown_concepts_methods_and_initializers(tmp_path):
    from sdlearn.fine_tuning import fine_tune

    with pytest.raises(ValueError, match="expected a concept of"):
        run("dreambooth", tmp_path, concept="circle")
    with pytest.raises(ValueError, match="expected a concept of"):
        run("lora", tmp_path, concept="filled")
    with pytest.raises(ValueError, match="expected a method of"):
        fine_tune("hypernetwork", STEPS, tmp_path)
    with pytest.raises(ValueError, match="initializer word that is one token"):
        run("textual-inversion", tmp_path, initializer="a square")
    with pytest.raises(ValueError, match="expected targets of"):
        run("lora", tmp_path, targets="everything")
    with pytest.raises(ValueError, match="learns a new word"):
        run("textual-inversion", tmp_path, token="diamond")


def test_cli_knows_every_method():
    from sdlearn.cli_parser import FINE_TUNE_NAMES, LORA_TARGET_NAMES
    from sdlearn.fine_tuning import FINE_TUNES, LORA_TARGETS

    assert FINE_TUNE_NAMES == METHODS == tuple(FINE_TUNES)
    assert tuple(LORA_TARGETS) == LORA_TARGET_NAMES
    assert set(METHODS) <= set(stages.STAGE_DEFAULTS)


@pytest.mark.parametrize("method", METHODS)
def test_cli_passes_the_fine_tune_options(method, monkeypatch, tmp_path):
    from sdlearn import fine_tuning
    from sdlearn.cli import main

    given = {}

    def fake(config, out_dir, **kwargs):
        given.update(kwargs, config=config)
        return {"metrics": {}, "seconds": 0.0}

    monkeypatch.setitem(fine_tuning.FINE_TUNES, method, fake)
    argv = ["train", method, "--out", str(tmp_path), "--concept", "hollow"]
    argv += ["--timestep-bias", "3", "--prior-images", "5", "--steps", "7"]
    argv += ["--text-encoder-lr", "0.005", "--eval-every", "200"]
    # passed to every method: fine_tune refuses it for all but DreamBooth
    assert main(argv + ["--train-text-encoder"]) == 0
    assert given["concept"] == "hollow" and given["timestep_bias"] == 3.0
    assert given["prior_images"] == 5 and given["config"].steps == 7
    assert given["train_text_encoder"] is True
    assert given["text_encoder_lr"] == 0.005 and given["eval_every"] == 200
    given.clear()
    assert main(argv) == 0
    assert "train_text_encoder" not in given  # the function's default


def test_a_records_command_repeats_its_settings(monkeypatch, tmp_path):
    """The command a record keeps reads back, through the CLI, to the run's
    training settings and options: every setting it prints has a flag."""
    import shlex

    from sdlearn import fine_tuning
    from sdlearn.cli import main

    given = {}

    def fake(config, out_dir, **kwargs):
        given.update(kwargs, config=config)
        return {"metrics": {}, "seconds": 0.0}

    monkeypatch.setitem(fine_tuning.FINE_TUNES, "dreambooth", fake)
    config = stages.STAGE_DEFAULTS["dreambooth"].updated(
        steps=2000, lr=3e-4, warmup_steps=20, min_lr_ratio=1.0, weight_decay=0.0
    )
    config = config.updated(ema_decay=0.995, seed=3, batch_size=16)
    options = dict(concept="hollow", prior_images=2000, train_text_encoder=True)
    options.update(eval_every=200)
    command = stages.command_line("dreambooth", config, ship=False, **options)
    argv = shlex.split(command)[1:] + ["--out", str(tmp_path)]
    assert main(argv) == 0
    assert given["config"] == config
    assert {k: given[k] for k in options} == options


def test_lora_targets_name_the_projections():
    import copy

    from sdlearn.fine_tuning import LORA_TARGETS
    from sdlearn.lora import add_lora

    unet = from_pretrained().unet
    every = add_lora(copy.deepcopy(unet), rank=2, targets=LORA_TARGETS["attention"])
    cross = add_lora(copy.deepcopy(unet), rank=2, targets=LORA_TARGETS["cross-kv"])
    # self- and cross-attention, 4 projections each, against 2 of one
    assert set(cross) < set(every) and len(every) == 4 * len(cross)
    assert all(name.endswith(("attn2.to_k", "attn2.to_v")) for name in cross)
    # and two convolutions of every ResnetBlock
    convs = add_lora(
        copy.deepcopy(unet), rank=2, targets=LORA_TARGETS["attention+convs"]
    )
    blocks = [
        n for n, _ in unet.named_modules() if n.rpartition(".")[0].endswith("resnets")
    ]
    assert set(convs) - set(every) == {
        f"{b}.{c}" for b in blocks for c in ("conv1", "conv2")
    }


def shipped_fine_tunes() -> list[tuple[str, str]]:
    """(method, concept) of every record in the package's fine_tunes folder."""
    from sdlearn.fine_tune_io import FINE_TUNES_DIR
    from sdlearn.fine_tuning import CONCEPTS

    names = sorted(p.stem for p in FINE_TUNES_DIR.glob("*.json"))
    found = []
    for name in names:
        method, concept = name.rsplit("-", 1)
        assert method in METHODS and concept in CONCEPTS, name
        found.append((method, concept))
    return found


def test_every_method_is_shipped_for_the_diamond():
    assert {m for m, c in shipped_fine_tunes() if c == "diamond"} == set(METHODS)


@pytest.mark.parametrize("method, concept", shipped_fine_tunes())
def test_shipped_fine_tunes_load_with_their_records(method, concept):
    from sdlearn.fine_tune_io import base_digest, load_fine_tune

    pipe, record = load_fine_tune(method, concept)
    assert record["method"] == method and record["concept"] == concept
    assert record["command"].startswith(f"sdlearn train {method} ")
    assert f"--concept {concept} " in record["command"]
    metrics = record["metrics"]
    assert {f"{concept} all", "base before all", "base after all"} <= set(metrics)
    assert len(pipe.tokenizer.encode(record["token"])) == 1  # a word it knows
    # made on the shipped base (load_fine_tune refuses any other)
    assert record["base"] == base_digest(from_pretrained())


# the chapter's target, as the shipped runs measured it: >= 80% of the new
# concept's prompts right after at most 5 minutes of training, the base prompts
# losing at most 5 points; the runs that meet it
MEETS_TARGET = [("dreambooth", "ring")]


@pytest.mark.parametrize("method, concept", MEETS_TARGET)
def test_shipped_fine_tunes_meet_the_target_as_recorded(method, concept):
    from sdlearn.fine_tune_io import read_fine_tune

    record, _ = read_fine_tune(method, concept)
    metrics = record["metrics"]
    assert metrics[f"{concept} all"] >= 80 and record["seconds"] <= 300
    assert metrics["base before all"] - metrics["base after all"] <= 5
