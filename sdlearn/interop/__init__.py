"""Interop with diffusers and transformers: one submodule per model.

    vae    ch. 02: sdlearn's AutoencoderKL <-> diffusers' AutoencoderKL
    clip   ch. 03: sdlearn's CLIPTextModel <-> transformers' CLIPTextModel
    unet   ch. 04: sdlearn's UNet <-> diffusers' UNet2DConditionModel

sdlearn's models are named like the libraries' wherever that costs nothing, so
most of this is configs: their keyword arguments, and the settings sdlearn does
not implement, refused by name. diffusers and transformers are development
dependencies; each function that builds one of their models imports it there.
The chapters' classes hold only their chapter's idea; diffusers keeps its
loaders apart from its models in the same way.
"""
