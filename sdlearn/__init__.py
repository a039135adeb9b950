"""sdlearn: Stable Diffusion from scratch in PyTorch.

The package grows a module or two per chapter, and a module imports only
modules of its own chapter or earlier ones, so that the import graph reads like
the table of contents. `CHAPTERS` below is that table, the one place that says
which chapter every module belongs to; tests/test_package_shape.py holds the
imports to it.
"""

__version__ = "0.1.0"

# every module of the package -> the chapter that builds it (00 to 10)
CHAPTERS: dict[str, int] = {
    "sdlearn": 0,  # this table
    "shapes": 0,  # the course's procedurally drawn, captioned image data
    "tour": 0,  # a map of Stable Diffusion and the shape legend
    "checks": 0,  # how the exercises' checks compare and print a verdict
    "checks.answers": 0,  # the learner's answers, kept and run again later
    "checks.tour": 0,
    "attention": 1,  # scaled dot-product attention and the attention layer
    "checks.attention_mistakes": 1,
    "checks.attention": 1,
    "weights": 2,  # checked loading, checkpoint files, the shipped tiny models
    "blocks": 2,  # ResnetBlock, Downsample, Upsample: the VAE's and the UNet's
    "vae": 2,  # the autoencoder
    "interpolation": 2,  # slerp: walking between latents on a sphere
    "interop": 2,  # interop with diffusers and transformers, a module per model
    "interop.vae": 2,
    "checks.vae": 2,
    "checks.vae_blocks": 2,
    "checks.vae_model": 2,
    "checks.interpolation": 2,
    "tokenizer": 3,  # CLIP's byte-level BPE tokenizer
    "clip": 3,  # the text encoder, and a tiny contrastive CLIP
    "interop.clip": 3,
    "checks.tokenizer": 3,
    "checks.clip": 3,
    "checks.contrastive": 3,
    "spatial_transformer": 4,  # where the UNet reads the text
    "unet": 4,  # the noise predictor
    "interop.unet": 4,
    "checks.unet": 4,
    "checks.spatial_transformer": 4,
    "checks.unet_blocks": 4,
    "schedulers.common": 5,  # what every noise scheduler shares
    "schedulers.ddpm": 5,  # DDPM
    "pixel_ddpm": 5,  # DDPM's training loss and sampling loop, on pixels
    "checks.schedule": 5,
    "checks.ddpm": 5,
    "checks.pixel_ddpm": 5,
    "devices": 6,  # where a model runs and in which precision
    "images": 6,  # images in and out of the pipeline
    "attention_maps": 6,  # where each prompt token's attention falls
    "pipeline": 6,  # text to image, img2img, inpainting
    "original_checkpoint": 6,  # SD 1.x's original single-file layout
    "single_file": 6,  # reading and writing such files
    "checks.pipeline": 6,
    "checks.editing": 6,
    "checks.learners_pipeline": 6,
    "image_measures": 7,  # what the scorer measures in a picture, in numpy
    "evaluate": 7,  # a non-learned scorer of generated shapes images
    "diffusion_loss": 7,  # how a diffusion model learns: DiffusionLoss
    "training": 7,  # the training loop every stage uses
    "stages": 7,  # the stages `sdlearn train` runs: VAE, CLIP, UNet
    "checks.training": 7,
    "checks.training_loop": 7,  # the loop's parts: clipping, the EMA, the order
    "checks.training_slips": 7,  # the loop itself, and the slips it is checked for
    "schedulers": 8,  # every sampler, and choosing one by name or config
    "schedulers.ddim": 8,  # DDIM and its inverse scheduler
    "schedulers.sigmas": 8,  # the sigma view of the samplers below
    "schedulers.euler": 8,  # Euler
    "schedulers.euler_ancestral": 8,  # Euler ancestral
    "schedulers.dpm_solver": 8,  # DPM-Solver++
    "schedulers.sigma_sampling": 8,  # a sampler as one loop over the noise levels
    "pipeline_io": 8,  # loading and saving pipelines (any sampler a config names)
    "inversion": 8,  # DDIM inversion: from an image back to its noise
    "checks.samplers": 8,
    "checks.sigma_sampling": 8,
    "lora": 9,  # low-rank adapters
    "textual_inversion": 9,  # new words for the text encoder
    "fine_tune_io": 9,  # shipped fine-tunes and run folders, applied to a pipeline
    "fine_tuning": 9,  # `sdlearn train lora`: a new shape or style
    "checks.lora": 9,
    "checks.textual_inversion": 9,
    "checks.fine_tuning": 9,
    "merging": 10,  # merging alike tokens before attention (ToMe)
    "small_decoder": 10,  # a VAE decoder of half the width, distilled
    "kernels": 10,  # sdlearn's own attention kernel for CPUs with AMX
    "fast": 10,  # what a step costs, what makes it shorter, the fast recipe
    "checks.fast": 10,
    "checks.fast_attention": 10,
    "cli_parser": 10,  # the `sdlearn` command's arguments and their defaults
    "cli": 10,  # the `sdlearn` command, which runs every chapter's parts
}
