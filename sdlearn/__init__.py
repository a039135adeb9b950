"""sdlearn: Stable Diffusion from scratch in PyTorch.

The package grows one module per chapter; later modules import only earlier ones:

    shapes       the course's procedurally generated, captioned image data
    checks       auto-checks for the chapters' exercises
    attention    ch. 01: scaled dot-product attention and the attention layers
"""

__version__ = "0.1.0"
