"""Indirect object identification (IOI, Wang et al. 2023): prompts, corrupted prompts, scores.

A prompt names two people, then repeats one of them (the subject S); a model that
has learnt the task completes it with the other one (the indirect object IO):

    When Mary and John went to the store, John gave a drink to   ->  Mary

Templates come in two forms: ABBA (IO named first: ``Mary and John ... John``) and
BABA (S named first: ``John and Mary ... John``), with different amounts of text
before, between and after the names, so that neither the position of IO nor that
of S gives the answer away. The corrupted ("ABC") prompt of each clean prompt keeps
its template, place and object but puts three other, distinct names in the IO, S1
and S2 slots: it carries no information about which name is the answer.

Prompts start with the tokenizer's BOS token if it has one (``<|endoftext|>``, as
GPT-2 prompts do in TransformerLens) and are right-padded to one length; all prompts
of one template have the same length and positions. The score is read at END, the
last real token:

    from tracevene.tasks import ioi
    tok = ioi.tokenizer()
    ds = ioi.make_dataset(tok, n=64, seed=0)
    logits = model(ds.clean).logits
    ioi.logit_diff(logits, ds).mean(), ioi.accuracy(logits, ds)

The same functions work with GPT-2's byte-level BPE tokenizer: names, places and
objects are used with a leading space (``" Mary"``), and those that are not one
token are dropped.

Two bundled checkpoints use ``tokenizer`` (saved with them; load with
``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained``): ``models/ioi``, a
2-layer, 4-head attention-only GPT-2 trained on these prompts
(``models/train_ioi.py``), and ``models/ioi_circuit``, a 3-layer, 3-head GPT-2 whose
weights implement duplicate-token, S-inhibition and name-mover heads by hand
(``models/build_ioi_circuit.py``; ``circuit.json`` lists them).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .. import metrics
from ..errors import ArgumentError
from ..metrics import at_position, logits_of

NAMES: tuple[str, ...] = (
    "Mary", "John", "Tom", "James", "Alice", "Bob", "Sarah", "David", "Emma", "Michael",
    "Anna", "Paul", "Laura", "Mark", "Kate", "Peter", "Lisa", "Daniel", "Rachel", "Chris",
    "Amy", "Steven", "Jessica", "Kevin", "Linda", "Brian", "Susan", "Eric", "Karen", "Jason",
    "Helen", "Adam", "Julia", "Ryan", "Grace", "Sam", "Emily", "Jack", "Lucy", "Ben",
)  # fmt: skip
PLACES: tuple[str, ...] = (
    "store", "park", "school", "garden", "station", "hospital", "office", "restaurant",
    "beach", "library", "market", "house",
)  # fmt: skip
OBJECTS: tuple[str, ...] = (
    "drink", "book", "ring", "bag", "ball", "key", "letter", "cake", "flower", "gift",
    "pen", "hat",
)  # fmt: skip

_FORMS = (  # each with {A} named first and {B} second in the first clause, {S2} later
    "When {A} and {B} went to the {PLACE}, {S2} gave a {OBJECT} to",
    "Then, {A} and {B} had a lot of fun at the {PLACE}. {S2} gave a {OBJECT} to",
    "After the long day, {A} and {B} got a {OBJECT} at the {PLACE}, and {S2} decided to give it to",
    "While {A} and {B} were working at the {PLACE}, {S2} handed the {OBJECT} to",
    "Friends {A} and {B} found a {OBJECT} at the {PLACE}. {S2} gave it to",
    "The {PLACE} was quiet when {A} and {B} arrived. Later that day, {S2} passed a {OBJECT} to",
    "{A} met {B} at the {PLACE}, and {S2} gave a {OBJECT} to",
    "Yesterday at the {PLACE}, {A} and {B} talked for hours. Then {S2} threw the {OBJECT} to",
)
TEMPLATES: tuple[str, ...] = tuple(
    t for f in _FORMS for t in (
        f.format(A="{IO}", B="{S}", S2="{S2}", PLACE="{PLACE}", OBJECT="{OBJECT}"),  # ABBA
        f.format(A="{S}", B="{IO}", S2="{S2}", PLACE="{PLACE}", OBJECT="{OBJECT}"),  # BABA
    )
)  # fmt: skip
"""Templates with slots ``{IO}``, ``{S}``, ``{S2}`` (S again), ``{PLACE}``, ``{OBJECT}``.

Even indices are ABBA forms (IO first), odd indices BABA forms (S first)."""

BOS = "<|endoftext|>"
_SLOT = re.compile(r"\{(IO|S|S2|PLACE|OBJECT)\}")
_WORD = re.compile(r"\w+|[^\w\s]+")


def tokenizer() -> Any:
    """The bundled word-level tokenizer: every word and punctuation mark is one token.

    Built in memory, deterministically, from ``NAMES``, ``PLACES``,
    ``OBJECTS`` and the words of ``TEMPLATES``. ``<|endoftext|>`` (id 0) is the
    BOS, EOS and pad token; ``tokenizer("text")`` prepends it, as ``make_dataset`` does.

    Returns:
        A ``transformers.PreTrainedTokenizerFast``.
    """
    import tokenizers
    import transformers
    from tokenizers import models, pre_tokenizers, processors

    words = [BOS, "<unk>", *NAMES, *PLACES, *OBJECTS]
    for template in TEMPLATES:
        words += _WORD.findall(_SLOT.sub(" ", template))
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, 0)]
    )
    tok.decoder = tokenizers.decoders.WordPiece(prefix="##", cleanup=True)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=BOS, pad_token=BOS, unk_token="<unk>"
    )


@dataclass
class Dataset:
    """IOI prompts as token ids, with their answers and the positions of the names.

    ``len(ds)`` is the number of prompts; ``ds[i:j]`` (or an index tensor, or a bool
    mask) is a Dataset of those prompts.

    Attributes:
        clean: ``[n, pos]`` prompts, right-padded with the pad (else EOS) id.
        corrupted: ``[n, pos]`` the ABC prompts: the same template, place and object,
            with three other distinct names in the IO, S1 and S2 slots.
        io: ``[n]`` token id of the indirect object (the right answer).
        s: ``[n]`` token id of the subject (the wrong answer).
        pos: ``"IO"``, ``"S1"``, ``"S1+1"``, ``"S2"``, ``"END"`` (the last real token)
            -> ``[n]`` positions; the same in the clean and the corrupted prompt.
        template: ``[n]`` index of each prompt's template in ``templates``.
        text: The clean prompts as text (without BOS).
        corrupted_text: The corrupted prompts as text.
        name_ids: ``[k]`` token ids of the names the prompts draw from.
        templates: The templates used (``template`` indexes these).
    """

    clean: Int[Tensor, "n pos"]
    corrupted: Int[Tensor, "n pos"]
    io: Int[Tensor, " n"]
    s: Int[Tensor, " n"]
    pos: dict[str, Int[Tensor, " n"]]
    template: Int[Tensor, " n"]
    text: list[str]
    corrupted_text: list[str] = field(repr=False)
    name_ids: Int[Tensor, " k"] = field(repr=False)
    templates: tuple[str, ...] = field(repr=False)

    def __len__(self) -> int:
        return len(self.text)

    def __getitem__(self, index: Any) -> Dataset:
        """The prompts at ``index`` (a slice, an int tensor or a bool mask) as a Dataset."""
        rows = torch.arange(len(self))[index].reshape(-1)
        return Dataset(
            clean=self.clean[rows],
            corrupted=self.corrupted[rows],
            io=self.io[rows],
            s=self.s[rows],
            pos={k: v[rows] for k, v in self.pos.items()},
            template=self.template[rows],
            text=[self.text[i] for i in rows.tolist()],
            corrupted_text=[self.corrupted_text[i] for i in rows.tolist()],
            name_ids=self.name_ids,
            templates=self.templates,
        )


def make_dataset(
    tokenizer: Any,
    n: int = 256,
    seed: int = 0,
    templates: Sequence[str] | None = None,
    names: Sequence[str] | None = None,
) -> Dataset:
    """``n`` IOI prompts and their ABC corruptions, templates in equal shares.

    Args:
        tokenizer: A Hugging Face tokenizer: ``tokenizer`` (the bundled models')
            or a BPE tokenizer such as GPT-2's, where a name is used as ``" Name"``.
        n: Number of prompts.
        seed: Seed of the draws (templates, names, places, objects).
        templates: Templates with ``{IO}``, ``{S}``, ``{S2}`` and optionally ``{PLACE}``,
            ``{OBJECT}`` slots (default: ``TEMPLATES``).
        names: Candidate names (default: ``NAMES``); those that are not one token
            for ``tokenizer`` are dropped, and at least 5 must remain.

    Returns:
        A ``Dataset``.
    """
    templates = tuple(TEMPLATES if templates is None else templates)
    _check_templates(templates)
    name_words, name_ids = _single_tokens(tokenizer, NAMES if names is None else names, "names")
    if len(name_words) < 5:
        raise ArgumentError(
            f"only {len(name_words)} of the names are one token each for this tokenizer "
            f"({list(name_words)}); IOI needs at least 5: IO, S, and three other names for "
            "the corrupted (ABC) prompt. Pass names= with more names that are single tokens "
            "(for BPE tokenizers such as GPT-2's, ' Name' with its leading space)."
        )
    places, _ = _single_tokens(tokenizer, PLACES, "places")
    objects, _ = _single_tokens(tokenizer, OBJECTS, "objects")
    g = torch.Generator().manual_seed(seed)
    template = torch.arange(n) % len(templates)
    template = template[torch.randperm(n, generator=g)]
    picks = torch.stack([torch.randperm(len(name_words), generator=g)[:5] for _ in range(n)])
    fill = torch.stack(
        [
            torch.randint(len(places), (n,), generator=g),
            torch.randint(len(objects), (n,), generator=g),
        ]
    )
    encode = _Encoder(tokenizer)
    rows = [
        _prompt(encode, templates[t], [name_words[i] for i in p], places[a], objects[b])
        for t, p, a, b in zip(template.tolist(), picks.tolist(), *fill.tolist(), strict=True)
    ]
    return _collate(tokenizer, rows, template, name_ids, templates)


def _check_templates(templates: tuple[str, ...]) -> None:
    if not templates:
        raise ArgumentError("templates= is empty: give at least one template (see ioi.TEMPLATES)")
    for t in templates:
        slots = _SLOT.findall(t)
        if sorted(s for s in slots if s in ("IO", "S", "S2")) != ["IO", "S", "S2"]:
            raise ArgumentError(
                f"template {t!r} has slots {slots}: it needs {{IO}}, {{S}} and {{S2}} once "
                "each (and may have {PLACE} and {OBJECT}), like ioi.TEMPLATES[0] = "
                f"{TEMPLATES[0]!r}."
            )
        if t.index("{S2}") < max(t.index("{IO}"), t.index("{S}")):
            raise ArgumentError(f"template {t!r}: {{S2}} must come after {{IO}} and {{S}}.")


def _single_tokens(tokenizer: Any, words: Sequence[str], what: str) -> tuple[list[str], Tensor]:
    """The words that are one token each when preceded by a space, and their ids."""
    kept, ids = [], []
    for w in dict.fromkeys(words):
        tokens = _ids(tokenizer, " " + w)
        if len(tokens) == 1 and tokens[0] != tokenizer.unk_token_id:
            kept.append(w)
            ids.append(tokens[0])
    if not kept:
        raise ArgumentError(
            f"none of the {what} {list(words)[:5]}... is one token for this tokenizer (as "
            f"' word', with a leading space); IOI prompts need single-token {what}: use "
            "ioi.tokenizer() or a tokenizer with a word-sized vocabulary such as GPT-2's."
        )
    return kept, torch.tensor(ids)


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class _Encoder:
    """Token ids of text pieces, each piece tokenised once (datasets reuse few pieces)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[str, list[int]] = {}
        self.bos_token_id = tokenizer.bos_token_id

    def __call__(self, text: str) -> list[int]:
        if text not in self.cache:
            self.cache[text] = _ids(self.tokenizer, text) if text.strip() else []
        return self.cache[text]


def _prompt(
    encode: _Encoder, template: str, names: list[str], place: str, obj: str
) -> dict[str, Any]:
    """Token ids of one clean and one corrupted prompt, and the positions of the slots.

    The template is tokenised piece by piece (text between slots, then each slot with
    its leading space), so that each slot is exactly one token at a known position.
    """
    io, s, a, b, c = names
    fills = {
        "clean": {"IO": io, "S": s, "S2": s, "PLACE": place, "OBJECT": obj},
        "corrupted": {"IO": a, "S": b, "S2": c, "PLACE": place, "OBJECT": obj},
    }
    bos = [] if encode.bos_token_id is None else [encode.bos_token_id]
    out: dict[str, Any] = {"clean": list(bos), "corrupted": list(bos), "pos": {}}
    for piece in _pieces(template):
        if piece.startswith("{"):
            slot = piece[1:-1]
            out["pos"][slot] = len(out["clean"])
            for kind in ("clean", "corrupted"):
                out[kind] += encode(" " + fills[kind][slot])
        else:
            ids = encode(piece)
            out["clean"] += ids
            out["corrupted"] += ids
    lead = " " if template.startswith("{") else ""  # a name first is tokenised as " Name"
    out["text"] = lead + template.format(**fills["clean"])
    out["corrupted_text"] = lead + template.format(**fills["corrupted"])
    return out


def _pieces(template: str) -> list[str]:
    """The template split into slots and the text between them (slot spaces dropped)."""
    pieces, last = [], 0
    for m in _SLOT.finditer(template):
        pieces.append(template[last : m.start()].rstrip(" "))
        pieces.append(m.group(0))
        last = m.end()
    pieces.append(template[last:])
    return [p for p in pieces if p]


def _collate(
    tokenizer: Any,
    rows: list[dict[str, Any]],
    template: Tensor,
    name_ids: Tensor,
    templates: tuple[str, ...],
) -> Dataset:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(r["clean"]) for r in rows)
    clean = torch.full((len(rows), width), pad, dtype=torch.long)
    corrupted = clean.clone()
    for i, r in enumerate(rows):
        clean[i, : len(r["clean"])] = torch.tensor(r["clean"])
        corrupted[i, : len(r["corrupted"])] = torch.tensor(r["corrupted"])
    pos = {k: torch.tensor([r["pos"][k] for r in rows]) for k in ("IO", "S", "S2")}
    pos = {
        "IO": pos["IO"],
        "S1": pos["S"],
        "S1+1": pos["S"] + 1,
        "S2": pos["S2"],
        "END": torch.tensor([len(r["clean"]) - 1 for r in rows]),
    }
    n = torch.arange(len(rows))
    return Dataset(
        clean=clean,
        corrupted=corrupted,
        io=clean[n, pos["IO"]],
        s=clean[n, pos["S1"]],
        pos=pos,
        template=template,
        text=[r["text"] for r in rows],
        corrupted_text=[r["corrupted_text"] for r in rows],
        name_ids=name_ids,
        templates=templates,
    )


def _end_logits(logits: Any, ds: Dataset) -> Float[Tensor, "n vocab"]:
    x = logits_of(logits)
    if x.shape[0] != len(ds):
        raise ArgumentError(
            f"logits have batch size {x.shape[0]} but the dataset has {len(ds)} prompts: "
            "pass the logits of ds.clean (or ds.corrupted, or ds[i:j] for a slice)."
        )
    return at_position(x, ds.pos["END"]).float()


def logit_diff(logits: Any, ds: Dataset) -> Float[Tensor, " n"]:
    """``logit(IO) - logit(S)`` at END, per prompt (float32).

    Args:
        logits: ``[n, pos, vocab]`` logits of ``ds.clean`` (or of any prompts with the
            same END positions), a model output with ``.logits``, or a result.
        ds: The dataset.
    """
    return metrics.logit_diff(_end_logits(logits, ds), ds.io, ds.s, position=None)


def accuracy(logits: Any, ds: Dataset) -> float:
    """Fraction of prompts whose IO logit at END is the largest among all name tokens.

    The name tokens are ``ds.name_ids`` (every name the dataset draws from), so a
    correct prompt has ``logit(IO) > logit(S)`` and beats every other name too. Ties
    count as wrong.

    Args:
        logits: ``[n, pos, vocab]`` logits of ``ds.clean``, an output or a result.
        ds: The dataset.
    """
    end = _end_logits(logits, ds)
    names = end[:, ds.name_ids.to(end.device)]
    is_io = ds.io.to(end.device)[:, None] == ds.name_ids.to(end.device)
    best_other = names.masked_fill(is_io, float("-inf")).max(1).values
    io = end[torch.arange(len(ds), device=end.device), ds.io.to(end.device)]
    return float((io > best_other).float().mean())
