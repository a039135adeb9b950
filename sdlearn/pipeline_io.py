"""Loading and saving pipelines: diffusers folders, original single-file SD 1.x
checkpoints, `sdlearn train`'s run folders and the course's shipped tiny model.

    pipe = from_pretrained()  # the tiny shapes model shipped in the package
    pipe = from_pretrained("runs/unet")  # a run folder of `sdlearn train`
    pipe = from_pretrained("stable-diffusion-v1-5")  # a diffusers folder
    pipe = from_pretrained("v1-5-pruned-emaonly.safetensors")  # one file
    save_pretrained(pipe, "folder")  # diffusers' own from_pretrained reads it
    save_single_file(pipe, "model.safetensors")

Every part's weights are checked key by key and shape by shape. A folder's
scheduler config may name any sampler, so this module comes after the
samplers of chapter 08; the pipeline of chapter 06 takes its parts as they are.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from sdlearn.clip import CLIPTextConfig, CLIPTextModel, pretrained_tiny_clip
from sdlearn.interop.clip import (
    clip_text_to_transformers,
    load_transformers_weights,
    text_config_from_transformers,
    text_config_to_transformers,
)
from sdlearn.interop.unet import unet_config_from_diffusers, unet_config_to_diffusers
from sdlearn.interop.vae import vae_config_from_diffusers, vae_config_to_diffusers
from sdlearn.pipeline import StableDiffusionPipeline
from sdlearn.schedulers import scheduler_from_config, scheduler_to_config
from sdlearn.single_file import load_original_into, save_original
from sdlearn.tokenizer import CLIPTokenizer
from sdlearn.unet import UNet, UNetConfig
from sdlearn.vae import AutoencoderKL, VAEConfig
from sdlearn.weights import (
    SHIPPED_DIR,
    config_from_json,
    load_checked,
    read_checkpoint_file,
    read_shipped,
)


def from_pretrained(path: str | Path | None = None) -> StableDiffusionPipeline:
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

    folder = Path(folder)
    _read_json(folder / "model_index.json")
    unet = UNet(unet_config_from_diffusers(_read_json(folder / "unet" / "config.json")))
    vae = AutoencoderKL(
        vae_config_from_diffusers(_read_json(folder / "vae" / "config.json"))
    )
    text_config = _read_json(folder / "text_encoder" / "config.json")
    text_encoder = CLIPTextModel(text_config_from_transformers(text_config))
    for part, model in (("unet", unet), ("vae", vae)):
        state_dict, source = _read_part_weights(folder, part)
        load_checked(model, {k: v.float() for k, v in state_dict.items()}, source)
    state_dict, source = _read_part_weights(folder, "text_encoder")
    load_transformers_weights(
        text_encoder, {k: v.float() for k, v in state_dict.items()}, source
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


def save_pretrained(pipeline: StableDiffusionPipeline, folder: str | Path) -> Path:
    """Write the pipeline as a diffusers folder that diffusers' own
    `StableDiffusionPipeline.from_pretrained` loads (safetensors weights)."""

    folder = Path(folder)
    configs = {
        "unet": {
            "_class_name": "UNet2DConditionModel",
            **unet_config_to_diffusers(pipeline.unet.config),
        },
        "vae": {
            "_class_name": "AutoencoderKL",
            **vae_config_to_diffusers(pipeline.vae.config),
        },
        "text_encoder": {
            "architectures": ["CLIPTextModel"],
            "model_type": "clip_text_model",
            **text_config_to_transformers(pipeline.text_encoder.config),
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

    configs = {
        "unet": asdict(pipeline.unet.config),
        "vae": asdict(pipeline.vae.config),
        "text_encoder": asdict(pipeline.text_encoder.config),
        "scheduler": scheduler_to_config(pipeline.scheduler),
    }
    metadata = {"sdlearn": json.dumps(configs)}
    parts = (pipeline.unet, pipeline.vae, pipeline.text_encoder)
    return save_original(path, *parts, metadata=metadata)


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
