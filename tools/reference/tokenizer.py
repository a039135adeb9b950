"""Reference ids: transformers' CLIPTokenizer on the tokenizer test corpus.

The tokenizer is built from the merges file sdlearn ships, turned into the
vocab.json + merges.txt pair that OpenAI's CLIP and the Stable Diffusion 1.x
checkpoints on the Hub carry, with SD 1.x settings (77 tokens, padded with
<|endoftext|>). Nothing here uses sdlearn's own tokenizer code.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
MERGES_GZ = ROOT / "sdlearn" / "data" / "bpe_simple_vocab_16e6.txt.gz"
CORPUS = ROOT / "tests" / "fixtures" / "tokenizer_corpus.json"
MAX_LENGTH = 77


def load_corpus(path: Path = CORPUS) -> list[str]:
    """The corpus strings, category after category, in file order."""
    groups = json.loads(path.read_text(encoding="utf-8"))
    return [text for texts in groups.values() for text in texts]


def corpus_digest(texts: list[str]) -> torch.Tensor:
    """SHA-256 of the corpus as 32 uint8s, to tell when the reference is stale."""
    data = json.dumps(texts, ensure_ascii=True).encode("ascii")
    return torch.frombuffer(bytearray(hashlib.sha256(data).digest()), dtype=torch.uint8)


def write_vocab_files(out_dir: Path, merges_gz: Path = MERGES_GZ) -> None:
    """Write vocab.json and merges.txt derived from OpenAI's merges file.

    The vocabulary is the one of OpenAI's CLIP: the 256 byte characters, the
    same with "</w>", one token per merge, then the two special tokens.
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    with gzip.open(merges_gz, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [ch + "</w>" for ch in byte_chars]
    tokens += ["".join(merge.split()) for merge in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != 49408:
        raise ValueError(f"expected 49408 distinct tokens, got {len(vocab)}")
    out_dir = Path(out_dir)
    (out_dir / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (out_dir / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8"
    )


def build_transformers_tokenizer(directory: Path):
    """transformers' CLIPTokenizer with SD 1.x settings, files written to DIRECTORY."""
    from transformers import CLIPTokenizer

    write_vocab_files(directory)
    return CLIPTokenizer.from_pretrained(
        str(directory), model_max_length=MAX_LENGTH, pad_token="<|endoftext|>"
    )


def make() -> dict[str, torch.Tensor]:
    import tempfile

    texts = load_corpus()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_transformers_tokenizer(Path(tmp))
    # the call diffusers' StableDiffusionPipeline.encode_prompt makes
    padded = tokenizer(
        texts,
        padding="max_length",
        max_length=MAX_LENGTH,
        truncation=True,
        return_tensors="pt",
    ).input_ids  # (N, 77)
    # every id, untruncated and without start/end tokens, flattened with offsets
    encoded = [tokenizer.encode(text, add_special_tokens=False) for text in texts]
    lengths = torch.tensor([0] + [len(ids) for ids in encoded])
    return {
        "input_ids": padded,
        "encoded_ids": torch.tensor([i for ids in encoded for i in ids]),
        "encoded_offsets": torch.cumsum(lengths, dim=0),  # (N + 1,)
        "corpus_sha256": corpus_digest(texts),
    }
