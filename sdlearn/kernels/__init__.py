"""Chapter 10's last rung: sdlearn's own attention kernel, for CPUs with AMX.

At Stable Diffusion 1.5's outermost level (4096 tokens, heads of width 40),
torch's fused CPU attention runs at under a fifth of the bfloat16 matmul peak,
most likely because each score has only 40 terms to add and its blocks of
scores go through L2 several times. `attention_amx.cpp`, next to this file,
computes blocks of 16 queries x 512 keys, small enough for L1, with AMX tiles
for the products and a short exp2 for the softmax (the file explains each
step). It takes 0.70 of torch's kernel's time there (tools/bench_rungs.py).

The kernel is compiled for this machine on first use (6 seconds here, then
cached by torch in ~/.cache/torch_extensions) and needs Linux on x86-64, a CPU
with AMX and AVX-512 BF16 that torch is allowed to use, a C++ compiler and
ninja. `amx_attention_available()` says whether all of that holds and, if not,
`why_not()` says what is missing. Importing this module adds the "amx" backend
to `sdlearn.attention`: this kernel where it runs and takes the inputs, torch's
elsewhere (another dtype, a mask, a shape it does not take).

    >>> from sdlearn.attention import set_attention_backend
    >>> set_attention_backend(unet, "amx")  # torch's kernel where it cannot run
"""

from __future__ import annotations

import platform
import warnings
from pathlib import Path

import torch
from torch.utils import cpp_extension

from sdlearn.attention import EXTRA_BACKENDS

SOURCE = Path(__file__).with_name("attention_amx.cpp")
# The compiler flags: the kernel's instructions, named, rather than -march=native,
# so that the build is the same on every machine that can run it.
CFLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bf16", "-mamx-tile", "-mamx-bf16"]

_state: dict[str, str | None] = {}  # "why_not": None once loaded, else the reason

LOG2_E = 1.4426950408889634  # e^x = 2^(x log2(e))
# 2^f on [0, 1) ~ c0 + c1 f + c2 f^2 + c3 f^3: the cubic whose largest relative
# error is smallest (7.5e-5), the kernel's own numbers
EXP2_CUBIC = (0.99992514, 0.69583404, 0.2260669, 0.07802422)


def exp_by_powers_of_two(x: torch.Tensor) -> torch.Tensor:
    """e^x as the kernel's softmax computes it, in PyTorch (chapter 10's
    exercise 10.7): e^x = 2^t with t = x log2(e), and 2^t = 2^n 2^f with n the
    whole part of t and f its fraction, in [0, 1). 2^n is exact: it only sets
    the float's exponent bits. 2^f is a cubic, `EXP2_CUBIC`, whose relative
    error is at most 7.5e-5; in float32, rounding included, under 1e-4
    wherever e^x is a normal float. bfloat16 rounds at 4e-3.

    Args:
        x: a float tensor of any shape.

    Returns:
        e^x, x's shape and dtype.
    """
    t = x * LOG2_E
    n = torch.floor(t)
    f = t - n  # in [0, 1)
    c0, c1, c2, c3 = EXP2_CUBIC
    return torch.ldexp(c0 + f * (c1 + f * (c2 + f * c3)), n)  # 2^f 2^n


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _missing() -> str | None:
    """What this machine lacks to run the kernel, in words; None if nothing."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return (
            f"it runs on Linux on x86-64, not {platform.system()} {platform.machine()}"
        )
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        # ATEN_CPU_CAPABILITY=avx2 (a laptop's) tells torch not to use AVX-512
        return (
            "torch runs this CPU at "
            f"{torch.backends.cpu.get_cpu_capability()}, not AVX512"
        )
    flags = _cpu_flags()
    lacking = [f for f in ("amx_tile", "amx_bf16", "avx512_bf16") if f not in flags]
    if lacking:
        return f"this CPU lacks {', '.join(lacking)}"
    return None


def load() -> bool:
    """Compile (once, then cached) and load the kernel if this machine can run
    it; warn once, naming the cause, if it cannot be built. Returns whether
    `torch.ops.sdlearn.amx_attention` is there."""
    if "why_not" in _state:
        return _state["why_not"] is None
    reason = _missing()
    if reason is None:
        try:
            cpp_extension.load(
                name="sdlearn_kernels",
                sources=[str(SOURCE)],
                extra_cflags=CFLAGS,
                extra_ldflags=["-fopenmp"],
                is_python_module=False,
            )
            _register_fake()
        except (OSError, RuntimeError, ImportError) as error:
            reason = f"it did not build: {str(error).strip().splitlines()[-1]}"
            warnings.warn(
                f"sdlearn's AMX attention kernel {reason}; using torch's", stacklevel=2
            )
    _state["why_not"] = reason
    return reason is None


def amx_attention_available() -> bool:
    """Whether sdlearn's kernel runs here (compiling it on first call)."""
    return load()


def why_not() -> str | None:
    """Why the kernel does not run here, in words; None if it does."""
    load()
    return _state["why_not"]


def _register_fake() -> None:
    # torch.compile traces the kernel by its output's shape and strides only
    @torch.library.register_fake("sdlearn::amx_attention")
    def _(q, k, v, scale):
        B, H, M, D = q.shape
        return q.new_empty(B, M, H, D).transpose(1, 2)


def fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the kernel takes these (B, nh, T, hd) tensors: bfloat16 on the CPU,
    an even head width up to 256, queries in 16s and keys in 32s, each head's
    vector contiguous."""
    head = q.shape[-1]
    return (
        all(x.dtype == torch.bfloat16 and x.device.type == "cpu" for x in (q, k, v))
        and all(x.stride(-1) == 1 for x in (q, k, v))
        and head % 2 == 0
        and head <= 256
        and q.shape[2] % 16 == 0
        and k.shape[2] % 32 == 0
    )


def loaded() -> bool:
    """Whether the kernel was loaded (by `load`); never compiles."""
    return _state.get("why_not", "") is None


def amx_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """softmax(q kᵀ · scale) v by sdlearn's kernel; scale 1/√hd by default.

    Args:
        q: (B, nh, Tq, hd); k, v: (B, nh, Tk, hd); as `fits` describes.

    Returns:
        (B, nh, Tq, hd), a view of a (B, Tq, nh, hd) tensor: merging the heads
        again costs no copy.
    """
    if not load():
        raise RuntimeError(
            f"sdlearn's AMX attention kernel does not run here: {why_not()}"
        )
    if not (q.ndim == k.ndim == v.ndim == 4 and k.shape == v.shape and fits(q, k, v)):
        raise ValueError(
            "expected bfloat16 CPU tensors q (B, nh, Tq, hd), k and v (B, nh, Tk, hd) "
            "with hd even and at most 256, Tq a multiple of 16, Tk of 32 and each "
            f"head's vector contiguous; got q {tuple(q.shape)} {q.dtype}, "
            f"k {tuple(k.shape)} {k.dtype}, v {tuple(v.shape)} {v.dtype}"
        )
    if q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch, heads or width"
        )
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return torch.ops.sdlearn.amx_attention(q, k, v, scale)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    causal: bool = False,
) -> torch.Tensor | None:
    """The "amx" backend: `amx_attention` where the kernel runs (compiled on the
    first call) and takes these inputs (no mask, not causal, as `fits` says),
    else None: the layer then uses torch's kernel."""
    if mask is None and not causal and load() and fits(q, k, v):
        return amx_attention(q, k, v)
    return None


EXTRA_BACKENDS["amx"] = attend
