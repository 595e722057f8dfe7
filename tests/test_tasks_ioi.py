"""The IOI task (tracevene.tasks.ioi) and the two bundled IOI models."""

import json
from pathlib import Path

import pytest
import torch
import transformers

import tracevene as iv
from tracevene.tasks import ioi

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok():
    return ioi.tokenizer()


@pytest.fixture(scope="module")
def ds(tok):
    return ioi.make_dataset(tok, n=96, seed=3)


# -- tokenizer and dataset ----------------------------------------------------------
def test_tokenizer_is_deterministic_and_word_level(tok):
    assert ioi.tokenizer().get_vocab() == tok.get_vocab()
    assert tok.pad_token_id == tok.bos_token_id == tok.eos_token_id == 0
    ids = tok("When Mary and John went to the store, John gave a drink to")["input_ids"]
    words = "When Mary and John went to the store , John gave a drink to".split()
    assert tok.convert_ids_to_tokens(ids) == [ioi.BOS, *words]
    assert tok.unk_token_id not in ids


def test_slots_hold_the_names(tok, ds):
    rows = torch.arange(len(ds))
    assert torch.equal(ds.clean[rows, ds.pos["IO"]], ds.io)
    assert torch.equal(ds.clean[rows, ds.pos["S1"]], ds.s)
    assert torch.equal(ds.clean[rows, ds.pos["S2"]], ds.s)
    assert torch.equal(ds.pos["S1+1"], ds.pos["S1"] + 1)
    assert (ds.io != ds.s).all()
    for i in range(len(ds)):
        end = int(ds.pos["END"][i])
        assert tok.convert_ids_to_tokens(ds.clean[i, 1 : end + 1]) == tok.tokenize(ds.text[i])
        assert (ds.clean[i, end + 1 :] == tok.pad_token_id).all()
        io_word, s_word = tok.convert_ids_to_tokens([int(ds.io[i]), int(ds.s[i])])
        template = ds.templates[int(ds.template[i])]
        assert ds.text[i].startswith(template.split("{")[0])
        assert ds.text[i].split().count(s_word) >= 2 and io_word in ds.text[i].split()


def test_corrupted_prompts_share_template_and_use_other_names(ds):
    rows = torch.arange(len(ds))
    slots = torch.stack([ds.pos[k] for k in ("IO", "S1", "S2")], 1)
    clean_names = ds.clean.gather(1, slots)
    abc = ds.corrupted.gather(1, slots)
    for i in range(len(ds)):
        assert len(set(abc[i].tolist())) == 3  # three distinct names
        assert not set(abc[i].tolist()) & set(clean_names[i].tolist())
        assert set(abc[i].tolist()) <= set(ds.name_ids.tolist())
    differs = ds.clean != ds.corrupted
    expected = torch.zeros_like(differs)
    expected[rows[:, None], slots] = True
    assert torch.equal(differs, expected)  # the rest of the prompt (and padding) is the same


def test_one_template_one_length_and_positions(ds):
    for t in ds.template.unique():
        rows = ds.template == t
        for key in ("IO", "S1", "S2", "END"):
            assert ds.pos[key][rows].unique().numel() == 1, key


def test_positions_vary_and_no_position_gives_the_answer_away(tok):
    ds = ioi.make_dataset(tok, n=len(ioi.TEMPLATES) * 8, seed=1)
    assert (torch.bincount(ds.template) == 8).all()  # templates in equal shares
    for key in ("IO", "S1", "S2", "END"):
        assert ds.pos[key].unique().numel() >= 4, key
    assert (ds.pos["IO"] < ds.pos["S1"]).float().mean() == 0.5  # ABBA and BABA alike
    for p in range(ds.clean.shape[1]):  # no position holds the answer in most prompts
        assert (ds.pos["IO"] == p).float().mean() < 0.25
    assert ((ds.pos["END"] - ds.pos["IO"]).unique().numel()) >= 6


def test_seeds_and_subsets(tok, ds):
    again = ioi.make_dataset(tok, n=96, seed=3)
    assert torch.equal(again.clean, ds.clean) and torch.equal(again.corrupted, ds.corrupted)
    assert not torch.equal(ioi.make_dataset(tok, n=96, seed=4).clean, ds.clean)
    part = ds[10:20]
    assert len(part) == 10 and part.text == ds.text[10:20]
    assert torch.equal(part.pos["END"], ds.pos["END"][10:20])


def test_bad_templates_and_names_are_refused(tok):
    with pytest.raises(ValueError, match=r"needs \{IO\}, \{S\} and \{S2\}"):
        ioi.make_dataset(tok, n=4, templates=["When {IO} and {S} met, he left"])
    with pytest.raises(ValueError, match="at least 5"):
        ioi.make_dataset(tok, n=4, names=["Mary", "John", "Zzyzx", "Tom"])


# -- metrics against a closed form --------------------------------------------------
def test_logit_diff_and_accuracy(tok, ds):
    n, width = ds.clean.shape
    logits = torch.randn(n, width, len(tok)) * 0.1
    rows = torch.arange(n)
    end = ds.pos["END"]
    logits[rows, end] = 0.0
    logits[rows, end, ds.io] = 2.0
    logits[rows, end, ds.s] = 0.5
    assert torch.equal(ioi.logit_diff(logits, ds), torch.full((n,), 1.5))  # 2.0 - 0.5, exact
    assert ioi.accuracy(logits, ds) == 1.0
    other = ds.name_ids[(ds.name_ids != ds.io[0]) & (ds.name_ids != ds.s[0])][0]
    logits[0, end[0], other] = 3.0  # another name wins prompt 0
    not_a_name = tok.convert_tokens_to_ids("store")  # a non-name beating IO does not count
    assert not_a_name not in ds.name_ids.tolist()
    logits[1, end[1], not_a_name] = 9.0
    logits[2, end[2], ds.s[2]] = 2.0  # a tie counts as wrong
    assert ioi.accuracy(logits, ds) == pytest.approx((n - 2) / n)
    assert ioi.logit_diff(logits, ds)[2] == 0.0
    with pytest.raises(ValueError, match="batch size"):
        ioi.accuracy(logits[:5], ds)


# -- a GPT-2-style byte-level BPE tokenizer, built here -----------------------------
@pytest.fixture(scope="module")
def bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    known = ["Mary", "John", "Tom", "James", "Alice", "Bob", "Sarah"]  # in the corpus
    words = " ".join(known * 3 + list(ioi.PLACES) + list(ioi.OBJECTS))
    corpus = [t.replace("{", "").replace("}", "") for t in ioi.TEMPLATES] + [words] * 3
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )
    return fast, known


def test_gpt2_style_tokenizer(bpe):
    tok, known = bpe
    assert tok.pad_token_id is None  # like GPT-2's: pads with EOS
    unknown = ["Xanthippe", "Zebulon", "Quentavious"]
    assert all(len(tok(" " + w, add_special_tokens=False)["input_ids"]) > 1 for w in unknown)
    ds = ioi.make_dataset(tok, n=48, seed=0, names=known + unknown)
    expected = [tok.convert_tokens_to_ids("Ġ" + w) for w in known]
    assert ds.name_ids.tolist() == expected  # the multi-token names dropped
    rows = torch.arange(len(ds))
    for key, ids in (("IO", ds.io), ("S1", ds.s), ("S2", ds.s)):
        assert torch.equal(ds.clean[rows, ds.pos[key]], ids)
    for i in range(len(ds)):
        end = int(ds.pos["END"][i])
        assert ds.clean[i, 0] == tok.bos_token_id
        assert tok.decode(ds.clean[i, 1 : end + 1]) == ds.text[i]
        assert tok.decode(ds.corrupted[i, 1 : end + 1]) == ds.corrupted_text[i]
        assert (ds.clean[i, end + 1 :] == tok.eos_token_id).all()
    with pytest.raises(ValueError, match="only 2 of the names are one token"):
        ioi.make_dataset(tok, n=4, names=["Mary", "John", *unknown])


# -- the bundled models -------------------------------------------------------------
def _load(name):
    path = ROOT / "models" / name
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    return model, transformers.AutoTokenizer.from_pretrained(path)


def test_trained_model_solves_held_out_prompts():
    model, tok = _load("ioi")
    assert tok.get_vocab() == ioi.tokenizer().get_vocab()
    ds = ioi.make_dataset(tok, n=512, seed=2024)
    with torch.no_grad():
        logits = model(ds.clean).logits
    assert ioi.accuracy(logits, ds) >= 0.95
    assert ioi.logit_diff(logits, ds).mean() > 1.0
    for block in model.transformer.h:  # attention only: the MLPs are zero
        assert all((p == 0).all() for p in block.mlp.parameters())


@pytest.fixture(scope="module")
def circuit():
    model, tok = _load("ioi_circuit")
    heads = json.loads((ROOT / "models/ioi_circuit/circuit.json").read_text())
    return iv.wrap(model, backend="torch", tokenizer=tok), tok, heads


def _run(model, ds, ablate=None):
    with iv.trace(model, ds.clean) as t:
        if ablate is not None:
            t.layer[ablate["layer"]].attn.head[ablate["head"]].z = 0
        patterns = [t.layer[i].attn.pattern.save() for i in range(model.n_layers)]
        outs = [
            [t.layer[i].attn.head[h].out.abs().max().save() for h in range(model.n_heads)]
            for i in range(model.n_layers)
        ]
        logits = t.logits.save()
    outs = torch.tensor([[o.value for o in row] for row in outs])
    return logits.value, [p.value for p in patterns], outs


def test_hand_built_circuit(circuit):
    model, tok, heads = circuit
    assert {h["role"] for h in heads} == {"duplicate-token", "s-inhibition", "name-mover"}
    ds = ioi.make_dataset(tok, n=128, seed=5)
    logits, patterns, outs = _run(model, ds)
    assert ioi.accuracy(logits, ds) == 1.0
    planted = torch.zeros_like(outs, dtype=torch.bool)
    for h in heads:
        planted[h["layer"], h["head"]] = True
    assert (outs[~planted] == 0).all() and (outs[planted] > 0.5).all()  # the rest write 0
    rows = torch.arange(len(ds))
    attends = {  # role -> (query position, key position) it must attend between
        "duplicate-token": ("S2", "S1"),
        "s-inhibition": ("END", "S2"),
        "name-mover": ("END", "IO"),
    }
    for h in heads:
        query, key = attends[h["role"]]
        pattern = patterns[h["layer"]][:, h["head"]]
        weight = pattern[rows, ds.pos[query], ds.pos[key]]
        assert weight.min() > 0.9, h
    for h in heads:  # each planted head is needed
        ablated, _, _ = _run(model, ds, ablate=h)
        assert ioi.logit_diff(ablated, ds).mean() < 0.5 * ioi.logit_diff(logits, ds).mean(), h
        assert ioi.accuracy(ablated, ds) < 0.5, h
