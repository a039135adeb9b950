"""Checks for chapter 09's textual inversion exercises: a new word in the
tokenizer and the token table, the embedding whose new rows alone learn, and
the optimiser's groups that give the text encoder a learning rate of its own.

The references are sdlearn's `add_token`, `NewTokenEmbedding` and
`TextEncoderLoss`. A method is written as a function taking `self`; the check
binds it to the package's module. The cases hold ids of new and old tokens in
one batch, the first new id V among them, and check that the gradient reaches
the new rows (a detached copy draws the right vectors but learns nothing); the
optimiser's groups are checked on text encoders with a new row, with trainable
blocks, and beside LoRA adapters. `sdlearn.checks.fine_tuning`, which the
chapter imports, has these checks too.
"""

from __future__ import annotations

import copy
import functools
import types
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sdlearn.checks import Case, Verdict, check, compare_values, seeded
from sdlearn.checks import hint as hint  # checks.hint(...) in a chapter
from sdlearn.checks.lora import small_unet
from sdlearn.clip import CLIPTextConfig, CLIPTextModel
from sdlearn.lora import add_lora
from sdlearn.textual_inversion import NewTokenEmbedding, TextEncoderLoss, add_token
from sdlearn.tokenizer import CLIPTokenizer

# --- Exercise 09.7: a new word ---------------------------------------------------


class Word:
    """A case's tokenizer and text encoder, made fresh for every call (adding a
    word changes them), described in a few words when a case fails."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def make(self) -> tuple[CLIPTokenizer, CLIPTextModel]:
        return _tokenizer(), copy.deepcopy(_text_encoder(self.seed))

    def __repr__(self) -> str:
        return "CLIP's tokenizer and a text encoder 8 wide"


@functools.cache
def _text_encoder(seed: int) -> CLIPTextModel:
    config = CLIPTextConfig(
        hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2
    )
    with torch.device("meta"):
        text_encoder = CLIPTextModel(config)
    return seeded(text_encoder, 950 + seed)


@functools.cache
def _clip_tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer()


def _tokenizer() -> CLIPTokenizer:
    """A fresh copy of CLIP's tokenizer (its vocabulary read once): the parts
    that adding a word changes are copied, the merges are shared."""
    tokenizer = copy.copy(_clip_tokenizer())
    tokenizer.vocab = dict(tokenizer.vocab)
    tokenizer.id_to_token = list(tokenizer.id_to_token)
    tokenizer.added_tokens = list(tokenizer.added_tokens)
    tokenizer.cache = dict(tokenizer.cache)
    return tokenizer


def _adding(fn: Callable) -> Callable:
    """What `fn(tokenizer, text_encoder, token, initializer)` did: the id it
    returned, how the token now encodes, the table's rows, the new row and
    whether the old rows stayed; or the error it raised."""

    @functools.wraps(fn)
    def run(word: Word, token: str, initializer: str) -> tuple:
        tokenizer, text_encoder = word.make()
        old = text_encoder.embeddings.token_embedding.weight.detach().clone()
        try:
            token_id = fn(tokenizer, text_encoder, token, initializer)
        except ValueError:
            return ("raised ValueError",)
        table = text_encoder.embeddings.token_embedding.weight.detach()
        kept = len(table) >= len(old) and torch.equal(table[: len(old)], old)
        row = (
            table[token_id]
            if isinstance(token_id, int) and token_id < len(table)
            else None
        )
        return token_id, tokenizer.encode(token), len(table), row, kept

    return run


def _adding_problem(actual: tuple, case: Case) -> str | None:
    expected = case.expected
    if len(expected) == 1 or len(actual) == 1:
        if actual[:1] == expected[:1]:
            return None
        if len(expected) == 1:
            return (
                f"{case.args[2]!r} is several tokens: which row would the word "
                "start from? Raise a ValueError"
            )
        return f"it raised a ValueError for the one-token initializer {case.args[2]!r}"
    token_id, encoded, rows, row, kept = actual
    want_id, want_encoded, want_rows, want_row, _ = expected
    if token_id != want_id:
        return f"returned {token_id!r}, expected the new token's id {want_id}"
    if encoded != want_encoded:
        return f"the tokenizer encodes the token as {encoded}, expected {want_encoded}"
    if rows != want_rows:
        return f"the token table has {rows} rows, expected {want_rows}"
    if not kept:
        return "the old rows of the token table changed"
    if row is None or not torch.equal(row, want_row):
        return "the new row is not the initializer's row"
    return None


def _add_token(tokenizer, text_encoder, token, initializer, *, mistake=""):
    ids = tokenizer.encode(initializer)
    if len(ids) != 1 and mistake != "several":
        raise ValueError(f"{initializer!r} is {len(ids)} tokens")
    (token_id,) = tokenizer.add_tokens(token)
    rows = tokenizer.vocab_size + (1 if mistake == "one more" else 0)
    text_encoder.resize_token_embeddings(rows)
    if mistake != "no copy":
        weight = text_encoder.embeddings.token_embedding.weight
        with torch.no_grad():
            weight[token_id] = weight[ids[0]]
    return token_id


TOKEN_MISTAKES = {
    "the new row was left where resizing put it (the mean row): copy the "
    "initializer's row into it": functools.partial(_add_token, mistake="no copy"),
    "the table has one row too many: after add_tokens, tokenizer.vocab_size "
    "counts the new word already": functools.partial(_add_token, mistake="one more"),
    "an initializer of several tokens was taken by its first: refuse it with "
    "a ValueError (which row would the word start from?)": functools.partial(
        _add_token, mistake="several"
    ),
}

TOKEN_HINTS = [
    "Three steps: give the tokenizer the new word, give the token table a row "
    "for it, and start that row at the initializer's. The initializer must be "
    "one token.",
    "tokenizer.encode(initializer) must be one id (else raise ValueError). "
    "tokenizer.add_tokens(token) returns the new ids; "
    "text_encoder.resize_token_embeddings(tokenizer.vocab_size) grows the "
    "table; then copy the initializer's row into the new one, under "
    "torch.no_grad().",
    "ids = tokenizer.encode(initializer); if len(ids) != 1: raise "
    "ValueError(...); (token_id,) = tokenizer.add_tokens(token); "
    "text_encoder.resize_token_embeddings(tokenizer.vocab_size); weight = "
    "text_encoder.embeddings.token_embedding.weight; with torch.no_grad(): "
    "weight[token_id] = weight[ids[0]]; return token_id.",
]


def check_add_token(fn: Callable) -> Verdict:
    """Exercise 09.7: `add_token(tokenizer, text_encoder, token, initializer)`."""
    cases = []
    for seed, (token, initializer) in enumerate(
        [("<diamond>", "square"), ("<ring>", "circle"), ("<x>", "hexagonal prism")]
    ):
        args = (Word(seed), token, initializer)
        cases.append(Case(args, _adding(add_token)(*args)))
    return check(
        "Exercise 09.7",
        _adding(fn),
        cases,
        compare=_adding_problem,
        hints=TOKEN_HINTS,
        mistakes={k: _adding(v) for k, v in TOKEN_MISTAKES.items()},
        keep="textual_inversion:add_token",
    )


# --- Exercise 09.8: an embedding whose new rows alone learn --------------------------


class Table:
    """A case's embedding, described in a few words when a case fails."""

    def __init__(self, embedding: NewTokenEmbedding) -> None:
        self.embedding = embedding

    def __repr__(self) -> str:
        V, D = self.embedding.frozen.shape
        return f"an embedding of {V} frozen rows and {len(self.embedding.new)} new"


def _on_table(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def call(table: Table, input_ids: torch.Tensor):
        return types.MethodType(fn, table.embedding)(input_ids)

    return call


def _embed(self, input_ids, *, boundary=0, new_first=False):
    V = self.frozen.shape[0]
    if new_first:
        return F.embedding(input_ids, torch.cat([self.new, self.frozen]))
    is_new = (input_ids >= V + boundary)[..., None]
    old = self.frozen[input_ids.clamp(max=V - 1)]
    fresh = self.new[(input_ids - V - boundary).clamp(0, len(self.new) - 1)]
    return torch.where(is_new, fresh, old)


EMBEDDING_MISTAKES = {
    "the new rows came first: the new tokens' ids start at V, after the "
    "frozen rows (torch.cat([self.frozen, self.new]))": functools.partial(
        _embed, new_first=True
    ),
    "off by one at the boundary: id V is the first new token (ids >= V), "
    "and it reads row 0 of self.new": functools.partial(_embed, boundary=1),
}

EMBEDDING_HINTS = [
    "The full table is the frozen rows followed by the new ones; look the ids "
    "up in it. Build it from self.new itself, so that the gradient reaches it.",
    "torch.cat the (V, D) self.frozen and the (n, D) self.new into (V + n, D) "
    "rows, then F.embedding(input_ids, table). No .detach(), no .data.",
    "table = torch.cat([self.frozen, self.new]); return F.embedding(input_ids, table).",
]


def check_new_token_embedding(fn: Callable) -> Verdict:
    """Exercise 09.8: `new_token_embedding_forward(self, input_ids)`,
    NewTokenEmbedding.forward: the vectors, and the gradient to `new`."""
    cases = []
    for seed, (V, n_new, D, ids) in enumerate(
        [
            (10, 1, 4, [[1, 10, 3, 10]]),
            (30, 2, 8, [[0, 30, 31, 29], [31, 5, 5, 0]]),
            (6, 3, 5, [[8, 7, 6, 2, 8]]),
        ]
    ):
        table = nn.Embedding(V + n_new, D)
        nn.init.normal_(table.weight, generator=torch.Generator().manual_seed(seed))
        reference = NewTokenEmbedding(table, n_new)
        input_ids = torch.tensor(ids)
        output = reference(input_ids)
        (grad,) = torch.autograd.grad(output.sum(), reference.new)
        # the vectors, and the gradient the new rows should get from their sum
        cases.append(Case((Table(reference), input_ids), (output.detach(), grad)))

    def compare(actual, case: Case) -> str | None:
        if isinstance(actual, torch.Tensor) and actual.requires_grad:
            values = actual.detach()
        else:
            values = actual
        expected, expected_grad = case.expected
        problem = compare_values(values, expected, 1e-6, 1e-6)
        if problem:
            return problem
        if not actual.requires_grad:
            return (
                "the right vectors, but no gradient reaches `new`: build the "
                "table from `self.new` itself, not a detached copy or `.data`"
            )
        new = case.args[0].embedding.new
        (grad,) = torch.autograd.grad(actual.sum(), new, allow_unused=True)
        if grad is None or not torch.allclose(grad, expected_grad):
            return "the right vectors, but the gradient of `new` is not the reference's"
        return None

    return check(
        "Exercise 09.8",
        _on_table(fn),
        cases,
        atol=1e-6,
        rtol=1e-6,
        compare=compare,
        hints=EMBEDDING_HINTS,
        mistakes={k: _on_table(v) for k, v in EMBEDDING_MISTAKES.items()},
        keep="textual_inversion:NewTokenEmbedding.forward",
    )


# --- Exercise 09.9: the optimiser's groups ----------------------------------------


class Loss:
    """A case's loss, described in a few words when a case fails."""

    def __init__(self, loss: TextEncoderLoss, description: str) -> None:
        self.loss, self.description = loss, description

    def __repr__(self) -> str:
        return self.description


def _text_encoder_loss(case: str, text_encoder_lr: float | None) -> TextEncoderLoss:
    """A loss over a small UNet and text encoder (meta device: names and
    shapes, no numbers), with what `case` trains."""
    with torch.device("meta"):
        config = CLIPTextConfig(
            vocab_size=40,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            eos_token_id=39,
        )
        text_encoder = CLIPTextModel(config)
        unet = small_unet(cross_attention_dim=16)
    unet.requires_grad_(case == "dreambooth")
    text_encoder.requires_grad_(case == "dreambooth")
    embeddings = text_encoder.embeddings
    embeddings.token_embedding.requires_grad_(False)
    if case != "dreambooth":  # a new word's row
        embeddings["token_embedding"] = NewTokenEmbedding(embeddings.token_embedding)
    if case == "lora":
        add_lora(unet, rank=2)
    ids = torch.zeros(3, 77, dtype=torch.long)
    return TextEncoderLoss(
        unet, None, text_encoder, ids, 0.18215, text_encoder_lr=text_encoder_lr
    )


def _grouping(fn: Callable) -> Callable:
    """`fn(self, lr)`'s groups as (lr, parameter names), sorted."""

    @functools.wraps(fn)
    def run(loss: Loss, lr: float) -> list:
        names = {id(p): n for n, p in loss.loss.named_parameters()}
        groups = types.MethodType(fn, loss.loss)(lr)
        found = [
            (g["lr"], tuple(names.get(id(p), "?") for p in g["params"])) for g in groups
        ]
        return sorted(found, key=lambda group: group[1])

    return run


def _grouping_problem(actual, case: Case) -> str | None:
    loss = case.args[0].loss
    trainable = [n for n, p in loss.named_parameters() if p.requires_grad]
    want = {n: lr for lr, group in case.expected for n in group}
    seen: dict[str, float] = {}
    for lr, group in actual:
        if not group:
            return "a group has no parameters: leave such a group out"
        for name in group:
            if name not in trainable:
                return f"{name} does not train (requires_grad is False): leave it out"
            if name in seen:
                return f"{name} is in two groups: torch refuses a parameter twice"
            seen[name] = lr
    missing = [n for n in trainable if n not in seen]
    if missing:
        return f"{missing[0]} trains but is in no group ({len(missing)} such)"
    wrong = [n for n in want if seen[n] != want[n]]
    if wrong:
        n = wrong[0]
        return f"{n} has lr {seen[n]}, expected {want[n]}"
    return None


def _groups(self, lr, *, mistake=""):
    """TextEncoderLoss.param_groups, or what one of the usual mistakes makes of it."""
    text = [p for p in self.text_encoder.parameters() if p.requires_grad]
    ids = {id(p) for p in text}
    rest = [
        p
        for p in self.parameters()
        if (p.requires_grad or mistake == "frozen")
        and (id(p) not in ids or mistake == "twice")
    ]
    text_lr = lr if mistake == "one lr" else self.text_encoder_lr
    if mistake != "no default":
        text_lr = text_lr or lr
    groups = [{"params": rest, "lr": lr}, {"params": text, "lr": text_lr}]
    return groups if mistake == "empty" else [g for g in groups if g["params"]]


GROUP_MISTAKES = {
    "the text encoder's parameters are in both groups: the first group "
    "holds the rest, the parameters not in the text encoder": functools.partial(
        _groups, mistake="twice"
    ),
    "frozen parameters went to the optimiser: keep only those with "
    "requires_grad": functools.partial(_groups, mistake="frozen"),
    "the text encoder's group has the run's lr: give it self.text_encoder_lr "
    "(pivotal tuning's larger rate)": functools.partial(_groups, mistake="one lr"),
    "self.text_encoder_lr is None here: the text encoder's group then takes "
    "the run's lr": functools.partial(_groups, mistake="no default"),
    "a group with no parameters was kept: leave out a group whose list is "
    "empty": functools.partial(_groups, mistake="empty"),
}

GROUP_HINTS = [
    "Two groups: what trains in the text encoder, at its own learning rate, "
    "and everything else that trains (in the UNet), at the run's. A parameter "
    "belongs to one group only, and an empty group is left out.",
    "text = the text encoder's parameters with requires_grad; rest = this "
    "module's parameters with requires_grad that are not in text (compare "
    "id(p)). The text group's lr is self.text_encoder_lr, or lr when that is "
    "None. Return the groups whose 'params' list is not empty.",
    "text = [p for p in self.text_encoder.parameters() if p.requires_grad]; "
    "ids = {id(p) for p in text}; rest = [p for p in self.parameters() if "
    "p.requires_grad and id(p) not in ids]; groups = [{'params': rest, 'lr': "
    "lr}, {'params': text, 'lr': self.text_encoder_lr or lr}]; return [g for "
    "g in groups if g['params']].",
]

# (what trains, text_encoder_lr, the run's lr)
GROUP_CASES = [
    ("textual inversion", 5e-3, 1e-3),
    ("dreambooth", None, 2e-4),
    ("lora", 1e-3, 2e-3),
]


def check_param_groups(fn: Callable) -> Verdict:
    """Exercise 09.9: `param_groups(self, lr)`, TextEncoderLoss.param_groups."""
    cases = []
    for what, text_lr, lr in GROUP_CASES:
        loss = Loss(
            _text_encoder_loss(what, text_lr),
            f"a loss whose {what} trains, text_encoder_lr {text_lr}",
        )
        cases.append(
            Case((loss, lr), _grouping(TextEncoderLoss.param_groups)(loss, lr))
        )
    return check(
        "Exercise 09.9",
        _grouping(fn),
        cases,
        compare=_grouping_problem,
        hints=GROUP_HINTS,
        mistakes={k: _grouping(v) for k, v in GROUP_MISTAKES.items()},
        keep="textual_inversion:TextEncoderLoss.param_groups",
    )
