"""sdlearn: Stable Diffusion from scratch in PyTorch.

The package grows one module per chapter; later modules import only earlier ones:

    shapes       ch. 00: the course's procedurally drawn, captioned image data
    tour         ch. 00: a map of Stable Diffusion and the shape legend
    attention    ch. 01: scaled dot-product attention and the attention layer
    vae          ch. 02: the autoencoder and its ResnetBlock, Downsample, Upsample
    tokenizer    ch. 03: CLIP's byte-level BPE tokenizer
    clip         ch. 03: the text encoder, and a tiny contrastive CLIP
    unet         ch. 04: the UNet, the noise predictor
    schedulers   ch. 05, 08: noise schedules and samplers (DDPM, DDIM and its
                 inversion, Euler, Euler ancestral, DPM-Solver++), one file each
    pipeline     ch. 06: text to image, img2img, inpainting; loading and saving
    weights      every weight-name mapping, and checked loading
    evaluate     ch. 07: a non-learned scorer of generated shapes images
    training     ch. 07: the training loop and the stages `sdlearn train` runs
    lora         ch. 09: low-rank adapters, merging, diffusers' LoRA file layout
    fine_tuning  ch. 09: `sdlearn train lora`, teaching the model a new shape or style
    checks       auto-checks for the chapters' exercises
    cli          the `sdlearn` command
"""

__version__ = "0.1.0"
