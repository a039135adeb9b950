"""Tests for sdlearn/textual_inversion.py and the added-token path of the
tokenizer, text encoder and pipeline: a new word is kept whole, only its row
trains, and diffusers and transformers read the same token and embedding."""

from __future__ import annotations

import pytest
import torch

from sdlearn.pipeline_io import from_pretrained, save_pretrained
from sdlearn.textual_inversion import (
    NewTokenEmbedding,
    add_token,
    load_learned_embeds,
    read_learned_embeds,
    save_learned_embeds,
)
from sdlearn.tokenizer import CLIPTokenizer
from tests.helpers import has, needs_diffusers, random_pipeline

PROMPT = "a small red <diamond> on the left"


def test_added_tokens_are_kept_whole_and_numbered_after_the_vocabulary():
    tokenizer = CLIPTokenizer()
    before = tokenizer.tokenize("a red diamond")
    assert tokenizer.add_tokens(["<diamond>", "<ring>"]) == [49408, 49409]
    assert tokenizer.vocab_size == 49410
    assert tokenizer.tokenize(PROMPT)[3] == "<diamond>"
    assert tokenizer.encode("<ring><diamond>") == [49409, 49408]
    assert tokenizer.decode(tokenizer(PROMPT)[0, :5]).endswith("red <diamond>")
    # words that are not the token are tokenized as before
    assert tokenizer.tokenize("a red diamond") == before
    # overlapping tokens: the longer one wins where it is written
    assert tokenizer.add_tokens("<dia>") == [49410]
    assert tokenizer.encode("<diamond> <dia>") == [49408, 49410]
    with pytest.raises(ValueError, match="already in the vocabulary"):
        tokenizer.add_tokens("<diamond>")
    with pytest.raises(ValueError, match="expected different tokens"):
        tokenizer.add_tokens(["<x>", "<x>"])
    with pytest.raises(ValueError, match="already in the vocabulary"):
        tokenizer.add_tokens("red</w>")
    for bad in ("<Diamond>", "two words", ""):
        with pytest.raises(ValueError, match="lower-case token without spaces"):
            tokenizer.add_tokens(bad)


def test_new_token_embedding_trains_only_its_new_rows():
    torch.manual_seed(0)
    table = torch.nn.Embedding(10, 4)
    embedding = NewTokenEmbedding(table, num_new=2)
    ids = torch.tensor([[1, 8, 9, 8]])
    torch.testing.assert_close(embedding(ids), table(ids), rtol=0, atol=0)
    assert [name for name, _ in embedding.named_parameters()] == ["new"]
    assert list(embedding.state_dict()) == ["new"]  # the frozen table is the base's
    embedding(ids).pow(2).sum().backward()
    assert embedding.new.grad.abs().min() > 0
    plain = embedding.to_embedding()
    torch.testing.assert_close(plain.weight, table.weight, rtol=0, atol=0)
    with pytest.raises(ValueError, match="new rows"):
        NewTokenEmbedding(table, num_new=0)


def test_add_token_starts_from_the_initializer_and_round_trips(tmp_path):
    pipe = random_pipeline()
    token_id = add_token(pipe.tokenizer, pipe.text_encoder, "<diamond>", "square")
    table = pipe.text_encoder.embeddings.token_embedding.weight
    square = pipe.tokenizer.encode("square")[0]
    torch.testing.assert_close(table[token_id], table[square], rtol=0, atol=0)
    assert pipe.text_encoder.config.vocab_size == 49409
    with torch.no_grad():
        table[token_id] = torch.randn(table.shape[1])
    path = save_learned_embeds(
        pipe.tokenizer, pipe.text_encoder, "<diamond>", tmp_path / "e.safetensors"
    )
    expected = pipe.encode_prompt([PROMPT])
    # into a fresh pipeline through its own method
    again = random_pipeline()
    assert load_learned_embeds(again.tokenizer, again.text_encoder, path) == "<diamond>"
    torch.testing.assert_close(again.encode_prompt([PROMPT]), expected)
    # a saved pipeline keeps its token (added_tokens.json, one more row)

    folder = save_pretrained(pipe, tmp_path / "pipe")
    loaded = from_pretrained(folder)
    torch.testing.assert_close(loaded.encode_prompt([PROMPT]), expected)
    with pytest.raises(ValueError, match="initializer word that is one token"):
        add_token(pipe.tokenizer, pipe.text_encoder, "<ring>", "a ring")


def test_learned_embeds_files_are_checked(tmp_path):
    from safetensors.torch import save_file

    pipe = random_pipeline()
    save_file({"emb_params": torch.randn(1, 32)}, str(tmp_path / "a1111.safetensors"))
    with pytest.raises(ValueError, match="name its token"):
        read_learned_embeds(tmp_path / "a1111.safetensors")
    name, vector = read_learned_embeds(tmp_path / "a1111.safetensors", "<x>")
    assert name == "<x>" and vector.shape == (32,)
    save_file({"<x>": torch.randn(1, 7)}, str(tmp_path / "narrow.safetensors"))
    with pytest.raises(ValueError, match=r"narrow.safetensors.*7-wide"):
        load_learned_embeds(
            pipe.tokenizer, pipe.text_encoder, tmp_path / "narrow.safetensors"
        )
    save_file({"<x>": torch.randn(2, 32)}, str(tmp_path / "two.safetensors"))
    with pytest.raises(ValueError, match="multi-vector"):
        read_learned_embeds(tmp_path / "two.safetensors")
    save_file(
        {"a": torch.randn(32), "b": torch.randn(32)}, str(tmp_path / "ab.safetensors")
    )
    with pytest.raises(ValueError, match=r"keys \['a', 'b'\]"):
        read_learned_embeds(tmp_path / "ab.safetensors")


@needs_diffusers
@pytest.mark.skipif(not has("transformers"), reason="diffusers' text side")
def test_diffusers_loads_the_learned_token_to_the_same_text_tokens(tmp_path):
    from diffusers import StableDiffusionPipeline as DiffusersPipeline
    from transformers import CLIPTokenizer as TransformersTokenizer

    pipe = random_pipeline()
    folder = save_pretrained(pipe, tmp_path / "pipe")
    add_token(pipe.tokenizer, pipe.text_encoder, "<diamond>", "square")
    with torch.no_grad():
        pipe.text_encoder.embeddings.token_embedding.weight[-1] = torch.randn(32)
    path = save_learned_embeds(
        pipe.tokenizer, pipe.text_encoder, "<diamond>", tmp_path / "e.safetensors"
    )
    theirs = DiffusersPipeline.from_pretrained(folder, safety_checker=None)
    theirs.load_textual_inversion(str(path))
    ids = theirs.tokenizer(
        PROMPT, padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    torch.testing.assert_close(ids, pipe.tokenizer(PROMPT), rtol=0, atol=0)
    with torch.no_grad():
        expected = theirs.text_encoder(ids)[0]
    torch.testing.assert_close(pipe.encode_prompt([PROMPT]), expected)
    # and transformers' tokenizer reads a saved tokenizer's added token
    pipe.tokenizer.save_pretrained(tmp_path / "tokenizer")
    again = TransformersTokenizer.from_pretrained(tmp_path / "tokenizer")
    assert again(PROMPT).input_ids[1:-1] == pipe.tokenizer.encode(PROMPT)
