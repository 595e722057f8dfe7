"""Sharing trained programs: the model card, push_to_hub (against a fake hub), loading
onto models with other site shapes, damaged directories of trained programs, the same
numbers in a new process, and atomic saves of programs with a card.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import huggingface_hub
import pytest
import torch
import torch.nn.functional as F
from huggingface_hub.repocard import metadata_load
from safetensors.torch import load_file, save_file

import models
import tracevene as iv
from tracevene.ir import serialize
from tracevene.runtime.interpret import source_sites

ROOT = Path(__file__).resolve().parent.parent
B, P, D, K = 16, 6, 32, 4
STEPS = 8
ROT_WEIGHT = "rotation.parametrizations.weight.original"

#: A user's own intervention, in a module of their own (imported by name, never by path).
USER_MODULE_NAME = "tracevene_sharing_user"
USER_MODULE = '''
"""A user's intervention: scale each dimension by a learned gain."""
import torch

import tracevene as iv
from tracevene.interventions.base import check_width


class SharingGain(iv.Intervention):
    def __init__(self, d: int):
        super().__init__()
        self.d = d
        self.log_gain = torch.nn.Parameter(torch.zeros(d))

    def forward(self, base, source=None):
        check_width(self, base, self.d)
        return base * self.log_gain.exp()
'''


# -- fixtures -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def user_dir(tmp_path_factory) -> Iterator[Path]:
    """A directory holding the user's module, on sys.path while this module's tests run."""
    directory = tmp_path_factory.mktemp("user")
    (directory / f"{USER_MODULE_NAME}.py").write_text(USER_MODULE)
    sys.path.insert(0, str(directory))
    yield directory
    sys.path.remove(str(directory))


@pytest.fixture(scope="module")
def user(user_dir) -> ModuleType:
    return importlib.import_module(USER_MODULE_NAME)


@pytest.fixture(scope="module")
def model() -> iv.Model:
    return iv.wrap(models.gpt2(), backend="torch")


def task(model: iv.Model, seed: int) -> dict[str, torch.Tensor]:
    """Random bases and sources; the label is the source's own next-token prediction."""
    base, source = models.tokens(B, P, seed=seed), models.tokens(B, P, seed=seed + 100)
    with torch.no_grad():
        labels = model.module(source).logits[:, -1].argmax(-1)
    return {"base": base, "source": source, "labels": labels}


def build(model: iv.Model, user: ModuleType) -> iv.Program:
    """DAS on layer 1's residual stream, followed by the user's gain."""
    torch.manual_seed(0)
    rot, gain = iv.RotatedSpace(d=D, k=K), user.SharingGain(d=D)
    with iv.trace(model) as t:
        src = t.source()
        mixed = rot(t.layer[1].resid_post, src.layer[1].resid_post)
        t.layer[1].resid_post = gain(mixed)
        t.logits[:, -1].save("logits")
    return t.program


def train(program: iv.Program, model: iv.Model, data: dict) -> list[float]:
    """A few Adam steps over program.run; returns the losses."""
    params = [p for m in program.modules.values() for p in m.parameters()]
    opt = torch.optim.Adam(params, lr=0.05)
    losses = []
    for _ in range(STEPS):
        logits = program.run(model, data["base"], [data["source"]])["logits"]
        loss = F.cross_entropy(logits, data["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def evaluate(program: iv.Program, model: iv.Model, data: dict) -> tuple[float, torch.Tensor]:
    """Interchange intervention accuracy, and the logits it is computed from."""
    with torch.no_grad():
        logits = program.run(model, data["base"], [data["source"]])["logits"]
    return (logits.argmax(-1) == data["labels"]).float().mean().item(), logits


@pytest.fixture(scope="module")
def trained(model, user) -> iv.Program:
    program = build(model, user)
    losses = train(program, model, task(model, seed=1))
    assert losses[-1] < losses[0]
    return program


@pytest.fixture(scope="module")
def eval_data(model) -> dict[str, torch.Tensor]:
    return task(model, seed=2)


@pytest.fixture(scope="module")
def saved(trained, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("saved") / "das_program"
    trained.save(directory)
    return directory


def files(directory: Path) -> list[str]:
    """The names in ``directory``, with the tensor file's hash written as ``<hash>``."""
    return sorted(
        re.sub(r"^tensors\.[0-9a-f]{16}\.", "tensors.<hash>.", p.name) for p in directory.iterdir()
    )


def tensor_path(directory: Path) -> Path:
    """The tensor file ``program.json`` names."""
    graph = json.loads((directory / "program.json").read_text())
    return directory / graph["tensor_file"]["name"]


SAVED_FILES = ["README.md", "program.json", "tensors.<hash>.safetensors"]


def assert_same_state(a: iv.Program, b: iv.Program) -> None:
    assert a == b and a.modules.keys() == b.modules.keys()
    for key in a.modules:
        sa, sb = a.modules[key].state_dict(), b.modules[key].state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), key


# -- model card -----------------------------------------------------------------------------
def test_training_changed_the_trained_parameters(trained):
    rot = trained.modules["m0"]
    assert rot.state_dict()[ROT_WEIGHT].abs().sum() > 0  # A starts at zero
    assert trained.modules["m1"].log_gain.abs().sum() > 0


def test_save_writes_a_model_card_with_hub_metadata(trained, saved):
    assert files(saved) == SAVED_FILES
    assert metadata_load(saved / "README.md") == {
        "library_name": "tracevene",
        "tags": ["tracevene", "interventions"],
    }
    card = (saved / "README.md").read_text()
    assert card.startswith(serialize.CARD_HEADER)
    assert str(trained) in card  # the listing
    assert "Source runs: 1" in card and "Placeholders: none" in card
    assert "`src1` reads `layer[1].resid_post`" in card
    assert "`base` writes `layer[1].resid_post`" in card
    spec = json.dumps(trained.modules["m0"].spec())
    assert f"- `m0`: `RotatedSpace`, spec `{spec}`" in card
    assert f"`{ROT_WEIGHT}` float32[32, 32]" in card
    assert f"- `m1`: `SharingGain` (user-defined, from `{USER_MODULE_NAME}`)" in card
    assert "iv.Program.load('das_program')" in card


def _python_blocks(card: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", card, flags=re.S | re.M)


def test_card_loading_example_imports_user_modules_and_passes_every_input(model, tmp_path, user):
    gain = user.SharingGain(d=D)
    with iv.trace(model) as t:
        pos = t.arg("pos")
        src = t.source()
        t.layer[0].resid_post[:, pos] = gain(src.layer[0].resid_post[:, pos])
        t.logits.save("out")
    t.program.save(tmp_path / "p")
    card = (tmp_path / "p" / "README.md").read_text()
    assert "Placeholders: `pos`" in card and "Named saves: `out`" in card
    (block,) = _python_blocks(card)
    ast.parse(block)
    assert f"import {USER_MODULE_NAME}  # registers" in block
    assert "program.run(model, base, sources=[source1], pos=...)" in block
    assert "print(result['out'])" in block


def test_card_of_a_program_without_modules_or_sources(model, tmp_path):
    with iv.trace(model) as t:
        t.layer[0].resid_post.sum().save()
    t.program.save(tmp_path / "p")
    card = (tmp_path / "p" / "README.md").read_text()
    assert "## Modules\n\nNone." in card and "Source runs: 0" in card
    assert "sources=[]" in _python_blocks(card)[0]


def test_code_spans_and_fences_survive_backticks():
    assert serialize._code("a`b") == "``a`b``"
    assert serialize._code("`x") == "`` `x ``"
    assert serialize._fenced("text", "has ``` inside").startswith("````text\n")


def test_loading_ignores_the_card(trained, saved, tmp_path):
    for name, edit in [
        ("removed", lambda d: (d / "README.md").unlink()),
        ("garbage", lambda d: (d / "README.md").write_bytes(b"\xff\x00 not a card")),
    ]:
        directory = tmp_path / name
        shutil.copytree(saved, directory)
        edit(directory)
        assert_same_state(iv.Program.load(directory), trained)


def test_save_replaces_a_saved_program_with_its_card(trained, model, tmp_path):
    with iv.trace(model) as t:
        t.layer[0].resid_post.sum().save("old")
    target = tmp_path / "program"
    t.program.save(target)
    trained.save(target)
    assert files(target) == SAVED_FILES
    assert str(trained) in (target / "README.md").read_text()
    assert_same_state(iv.Program.load(target), trained)
    assert files(tmp_path) == ["program"]


def test_save_refuses_a_directory_with_someone_elses_readme(trained, tmp_path):
    for extra in ([], ["program.json", "tensors.safetensors"]):
        target = tmp_path / f"project{len(extra)}"
        target.mkdir()
        (target / "README.md").write_text("# My project\n")
        for name in extra:
            (target / name).write_text("{}")
        with pytest.raises(FileExistsError, match=r"exists and is not a saved program"):
            trained.save(target)
        assert (target / "README.md").read_text() == "# My project\n"


# -- push_to_hub ----------------------------------------------------------------------------
class FakeHfApi:
    """Records calls and keeps a copy of each uploaded folder; never touches the network."""

    instances: list[FakeHfApi] = []
    store: Path

    def __init__(self, token=None):
        self.token = token
        self.calls: list[tuple[str, tuple, dict]] = []
        FakeHfApi.instances.append(self)

    def create_repo(self, repo_id, *, exist_ok=False, private=None, **kwargs):
        self.calls.append(("create_repo", (repo_id,), dict(exist_ok=exist_ok, private=private)))
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, commit_message=None, **kwargs):
        self.calls.append(
            ("upload_folder", (), dict(repo_id=repo_id, commit_message=commit_message))
        )
        shutil.copytree(folder_path, self.store / repo_id)
        self.folder_path = Path(folder_path)
        return huggingface_hub.CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/abc123",
            commit_message=commit_message,
            commit_description="",
            oid="abc123",
        )


@pytest.fixture()
def fake_hub(tmp_path, monkeypatch) -> type[FakeHfApi]:
    FakeHfApi.instances = []
    FakeHfApi.store = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    return FakeHfApi


def test_push_to_hub_uploads_a_directory_that_loads_with_the_same_numbers(
    trained, model, eval_data, fake_hub
):
    url = trained.push_to_hub("alice/das-layer1", token="hf_x", private=True)
    assert url == "https://huggingface.co/alice/das-layer1/commit/abc123"
    (api,) = fake_hub.instances
    assert api.token == "hf_x"
    assert api.calls == [
        ("create_repo", ("alice/das-layer1",), {"exist_ok": True, "private": True}),
        (
            "upload_folder",
            (),
            {"repo_id": "alice/das-layer1", "commit_message": "Upload tracevene program"},
        ),
    ]
    assert not api.folder_path.exists()  # the temporary directory is gone
    copy = fake_hub.store / "alice" / "das-layer1"
    assert files(copy) == SAVED_FILES
    card = (copy / "README.md").read_text()
    assert "program = iv.Program.load('alice/das-layer1')  # from the hub" in card
    loaded = iv.Program.load(copy)
    assert_same_state(loaded, trained)
    ours, theirs = evaluate(trained, model, eval_data), evaluate(loaded, model, eval_data)
    assert ours[0] == theirs[0] and torch.equal(ours[1], theirs[1])


def test_push_to_hub_defaults(trained, fake_hub):
    trained.push_to_hub("bob/p", commit_message="v2")
    (api,) = fake_hub.instances
    assert api.token is None
    assert api.calls[0][2] == {"exist_ok": True, "private": False}
    assert api.calls[1][2]["commit_message"] == "v2"


def test_push_to_hub_without_huggingface_hub_says_what_to_install(trained, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import raises ImportError
    with pytest.raises(ImportError, match=r"needs the huggingface_hub package.*pip install"):
        trained.push_to_hub("alice/p")


def test_push_to_hub_of_an_unsaveable_program_creates_no_repo(model, fake_hub):
    with iv.trace(model) as t:
        torch.nn.ReLU()(t.layer[0].resid_post).save()
    with pytest.raises(iv.RegistryError, match=r"cannot save a program that calls a ReLU"):
        t.program.push_to_hub("alice/p")
    assert fake_hub.instances == [] or fake_hub.instances[0].calls == []


# -- Program.load from the hub (an offline hub cache) ----------------------------------------
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


def add_to_hub_cache(cache: Path, repo_id: str, program_dir: Path, commit: str, ref="main"):
    """Lay a saved program out as huggingface_hub caches a downloaded snapshot.

    ``models--owner--name/blobs/<hash>`` holds the files, ``snapshots/<commit>/<file>``
    links to them and ``refs/<ref>`` names the commit.
    """
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for path in program_dir.iterdir():
        blob = repo / "blobs" / f"{commit[:8]}-{path.name}"
        shutil.copyfile(path, blob)
        (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)


@pytest.fixture()
def hub_cache(saved, model, user, tmp_path, monkeypatch) -> Path:
    """An offline hub cache holding alice/das-layer1: main is trained, v0 untrained."""
    cache = tmp_path / "hub-cache"
    add_to_hub_cache(cache, "alice/das-layer1", saved, COMMIT)
    build(model, user).save(tmp_path / "untrained")
    add_to_hub_cache(cache, "alice/das-layer1", tmp_path / "untrained", OTHER_COMMIT, "v0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub read HF_HUB_OFFLINE when it was imported; Program.load reads it now
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def no_network(*args, **kwargs):
        raise AssertionError("the hub was contacted although HF_HUB_OFFLINE=1")

    monkeypatch.setattr(huggingface_hub.hf_api.HfApi, "repo_info", no_network)
    return cache


def test_load_from_the_hub_cache_offline(hub_cache, trained, model, eval_data):
    loaded = iv.Program.load("alice/das-layer1", cache_dir=hub_cache)
    assert_same_state(loaded, trained)
    ours, theirs = evaluate(trained, model, eval_data), evaluate(loaded, model, eval_data)
    assert ours[0] == theirs[0] and torch.equal(ours[1], theirs[1])


def test_load_from_the_hub_uses_hf_hub_cache(hub_cache, trained, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))
    assert_same_state(iv.Program.load("alice/das-layer1"), trained)


def test_load_from_the_hub_at_a_revision(hub_cache, trained, model, user):
    untrained = build(model, user)
    for revision in ["v0", OTHER_COMMIT]:
        loaded = iv.Program.load("alice/das-layer1", revision=revision, cache_dir=hub_cache)
        assert_same_state(loaded, untrained)
    assert iv.Program.load("alice/das-layer1", revision=COMMIT, cache_dir=hub_cache) == trained


def test_load_from_the_hub_not_in_the_cache_says_where_it_looked(hub_cache):
    with pytest.raises(
        FileNotFoundError,
        match=r"(?s)outgoing traffic has been disabled.*"
        r"Program.load\('alice/other'\): there is no such local directory.*"
        r"looked up as a Hugging Face hub repository in the local hub cache "
        r"only \(HF_HUB_OFFLINE is set\)",
    ):
        iv.Program.load("alice/other", cache_dir=hub_cache)


def test_a_local_directory_wins_over_the_hub(saved, trained, tmp_path, monkeypatch):
    def no_hub(*args, **kwargs):
        raise AssertionError("a local directory was looked up on the hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    monkeypatch.chdir(tmp_path)
    shutil.copytree(saved, tmp_path / "alice" / "das-layer1")
    assert_same_state(iv.Program.load("alice/das-layer1"), trained)


def test_load_from_the_hub_without_huggingface_hub_says_what_to_install(
    saved, trained, monkeypatch
):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import raises ImportError
    with pytest.raises(
        ImportError,
        match=r"^Program.load\('alice/p'\) \(not a local directory, so a hub repository\) "
        r"needs the huggingface_hub package, which is not installed: pip install huggingface_hub",
    ):
        iv.Program.load("alice/p")
    assert_same_state(iv.Program.load(saved), trained)  # directories need no hub
    assert_same_state(iv.Program.load(str(saved)), trained)


def test_load_of_a_missing_path_that_is_no_repo_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ["runs", "runs/das/v1", "./alice/p", str(tmp_path / "x")]:
        with pytest.raises(iv.ProgramFormatError, match=r"is not a saved program"):
            iv.Program.load(name)


def test_hub_arguments_with_a_local_directory_are_refused(saved):
    with pytest.raises(
        iv.ArgumentError, match=r"revision, cache_dir and token apply to hub repositories"
    ):
        iv.Program.load(saved, revision="main")


# -- other site shapes ----------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "nnsight"])
def test_loading_onto_a_model_with_other_widths_names_the_site_and_both_shapes(
    saved, user, backend
):
    loaded = iv.Program.load(saved)
    wide = iv.wrap(models.gpt2(n_embd=48), backend=backend)
    line = loaded.nodes[2].loc
    with pytest.raises(iv.ShapeError) as info:
        loaded.run(wide, models.tokens(2, P, seed=1), [models.tokens(2, P, seed=2)])
    message = str(info.value)
    assert message.startswith(f"line {line}: RotatedSpace (m0) applied to ")
    assert "base.layer[1].resid_post, src1.layer[1].resid_post:" in message
    assert "RotatedSpace(d=32) was given a base of shape (2, 6, 48)" in message
    assert "its last dimension must be 32" in message
    assert "run it on a model whose sites have the widths it was built for" in message


def test_shape_error_names_every_site_an_argument_is_computed_from(model, user):
    gain = user.SharingGain(d=D + 1)
    with iv.trace(model) as t:
        src = t.source()
        mixed = t.layer[0].resid_post[:, -1] * 0.5 + src.layer[2].mlp.out[:, -1]
        gain(mixed).save()
    program = t.program
    call = next(n for n in program.nodes if n.op == "call_module")
    assert source_sites(program, call) == ["base.layer[0].resid_post", "src1.layer[2].mlp.out"]
    with pytest.raises(iv.ShapeError, match=r"applied to base\.layer\[0\]\.resid_post, "
                       r"src1\.layer\[2\]\.mlp\.out: SharingGain\(d=33\)"):  # fmt: skip
        program.run(model, models.tokens(2, P), [models.tokens(2, P, seed=2)])
    with iv.trace(model) as t:
        gain(t.arg("x") + 1.0).save()
    with pytest.raises(iv.ShapeError, match=r"applied to no site \(constants and placeholders\)"):
        t.program.run(model, models.tokens(2, P), x=torch.zeros(2, D))


# -- damaged directories of a trained program -----------------------------------------------
def _edit_graph(fn: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        graph = json.loads((d / "program.json").read_text())
        fn(graph)
        (d / "program.json").write_text(json.dumps(graph))

    return apply


def _edit_tensors(fn: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        blobs = load_file(tensor_path(d))
        fn(blobs)
        save_file(blobs, tensor_path(d))

    return apply


def _both(*edits: Callable[[Path], None]) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        for edit in edits:
            edit(d)

    return apply


def _module(key: str, fn: Callable[[dict], None]) -> Callable[[Path], None]:
    return _edit_graph(lambda g: fn(g["modules"][key]))


def _truncate(d: Path) -> None:
    data = tensor_path(d).read_bytes()
    tensor_path(d).write_bytes(data[: len(data) // 2])


def _spec(**changes) -> Callable[[dict], None]:
    return lambda entry: entry["spec"].update(changes)


WEIGHT = f"module/m0/{ROT_WEIGHT}"
ONE_SAVE = (
    r"The two files must come from one save: copy both program\.json and "
    r"tensors\.safetensors from the same save, or save the program again\."
)
NOT_FIT = (
    r"The spec in program\.json and the saved tensors do not fit together: restore the "
    r"spec the program was saved with, or save the program again\."
)
ROT_SPEC = (
    r'RotatedSpace with spec \{"d": 32, "k": 4, "variables": null, '
    r'"orthogonal_map": "cayley"\}'
)
ROT_W = re.escape(repr(ROT_WEIGHT))

DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "rotation weight removed from the tensors": (
        _edit_tensors(lambda b: b.pop(WEIGHT)),
        rf"tensor {re.escape(repr(WEIGHT))} is missing from tensors\.safetensors, which "
        rf"program\.json says holds it \(\[32, 32\] float32\)\. {ONE_SAVE}",
    ),
    "user weight removed from the tensors": (
        _edit_tensors(lambda b: b.pop("module/m1/log_gain")),
        rf"tensor 'module/m1/log_gain' is missing from tensors\.safetensors.*{ONE_SAVE}",
    ),
    "rotation weight removed from tensors and manifest": (
        _both(
            _edit_tensors(lambda b: b.pop(WEIGHT)),
            _module("m0", lambda e: e["tensors"].pop(ROT_WEIGHT)),
        ),
        rf"module m0: tensor {ROT_W} is missing; {ROT_SPEC} has tensors \['rotation\..*\], "
        rf"the saved program has \['rotation\.parametrizations\.weight\.0\.start'\]\. {NOT_FIT}",
    ),
    "extra tensor in tensors and manifest": (
        _both(
            _edit_tensors(lambda b: b.__setitem__("module/m1/bias", torch.zeros(D))),
            _module("m1", lambda e: e["tensors"].update(bias={"shape": [D], "dtype": "float32"})),
        ),
        rf"module m1: unexpected tensors \['bias'\]; SharingGain with spec \{{\"d\": 32\}} has "
        rf"tensors \['log_gain'\]\. {NOT_FIT}",
    ),
    "weight of another shape, manifest updated": (
        _both(
            _edit_tensors(lambda b: b.__setitem__(WEIGHT, torch.zeros(D, D - 1))),
            _module("m0", lambda e: e["tensors"][ROT_WEIGHT].update(shape=[D, D - 1])),
        ),
        rf"module m0: tensor {ROT_W} has shape \[32, 31\], but its spec gives \[32, 32\] "
        rf"\({ROT_SPEC}\)\. {NOT_FIT}",
    ),
    "weight of another shape, manifest not updated": (
        _edit_tensors(lambda b: b.__setitem__("module/m1/log_gain", torch.zeros(D + 1))),
        rf"tensor 'module/m1/log_gain' has shape \[33\] torch\.float32 in tensors\.safetensors "
        rf"but \[32\] float32 in program\.json\. {ONE_SAVE}",
    ),
    "weight of another dtype, manifest not updated": (
        _edit_tensors(lambda b: b.__setitem__(WEIGHT, b[WEIGHT].double())),
        rf"tensor {re.escape(repr(WEIGHT))} has shape \[32, 32\] torch\.float64 in "
        rf"tensors\.safetensors but \[32, 32\] float32 in program\.json\. {ONE_SAVE}",
    ),
    "intervention type renamed": (
        _module("m0", lambda e: e.update(type="RotatedSpce")),
        r"program\.json: module 'm0': unknown intervention type 'RotatedSpce'; registered "
        r"types: .*RotatedSpace.*If it is your own class, import the module that registers "
        r"it",
    ),
    "user type not imported": (
        _module("m1", lambda e: e.update(type="NeverImportedGain")),
        r"program\.json: module 'm1': unknown intervention type 'NeverImportedGain'; "
        r"registered types: .*SharingGain.*import the module that registers it",
    ),
    "truncated tensors file": (
        _truncate,
        r"tensors\.[0-9a-f]{16}\.safetensors is damaged or truncated \(.+\); "
        r"its tensors cannot be read\. "
        r"Copy or download the whole directory again, or save the program again\.",
    ),
    "d changed in the rotation's spec": (
        _module("m0", _spec(d=48)),
        rf"module m0: tensor {ROT_W} has shape \[32, 32\], but its spec gives \[48, 48\] "
        rf"\(RotatedSpace with spec \{{\"d\": 48, .*\}}\)\. {NOT_FIT}",
    ),
    "d changed in the user's spec": (
        _module("m1", _spec(d=16)),
        rf"module m1: tensor 'log_gain' has shape \[32\], but its spec gives \[16\] "
        rf"\(SharingGain with spec \{{\"d\": 16\}}\)\. {NOT_FIT}",
    ),
    "k out of range in the spec": (
        _module("m0", _spec(k=40)),
        r"program\.json: module 'm0': bad spec \{'d': 32, 'k': 40, .*\} for RotatedSpace: "
        r"k=40 must be between 1 and d=32",
    ),
    "unknown argument in the spec": (
        _module("m1", _spec(width=3)),
        r"program\.json: module 'm1': bad spec \{'d': 32, 'width': 3\} for SharingGain: "
        r".*unexpected keyword argument 'width'",
    ),
    "spec not an object": (
        _module("m0", lambda e: e.update(spec=32)),
        r"program\.json: module 'm0': bad spec 32 for RotatedSpace: expected an object",
    ),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_trained_program_raises_program_format_error(saved, tmp_path, case):
    damage, message = DAMAGE[case]
    directory = tmp_path / "damaged"
    shutil.copytree(saved, directory)
    damage(directory)
    with pytest.raises(iv.ProgramFormatError, match=message):
        iv.Program.load(directory)


def test_damage_cases_edit_the_modules_they_name(saved):
    graph = json.loads((saved / "program.json").read_text())
    assert {k: m["type"] for k, m in graph["modules"].items()} == {
        "m0": "RotatedSpace",
        "m1": "SharingGain",
    }
    assert graph["modules"]["m0"]["spec"] == {
        "d": 32,
        "k": 4,
        "variables": None,
        "orthogonal_map": "cayley",
    }


# -- a new process, the same numbers --------------------------------------------------------
def test_trained_program_gives_the_same_numbers_in_a_new_process(
    trained, saved, model, eval_data, user_dir, tmp_path
):
    save_file(eval_data, tmp_path / "data.safetensors")
    out = tmp_path / "out.safetensors"
    child = textwrap.dedent(
        f"""
        import torch
        from safetensors.torch import load_file, save_file

        import models
        import tracevene as iv
        import {USER_MODULE_NAME}  # registers SharingGain, as the user's import would

        data = load_file({str(tmp_path / "data.safetensors")!r})
        program = iv.Program.load({str(saved)!r})
        model = iv.wrap(models.gpt2(), backend="torch")
        with torch.no_grad():
            logits = program.run(model, data["base"], [data["source"]])["logits"]
        iia = (logits.argmax(-1) == data["labels"]).float().mean()
        evaluated = iv.evaluate(program, model, [data], progress=False)  # IIA by default
        save_file({{"logits": logits.contiguous(), "iia": iia.reshape(1),
                   "evaluated": torch.tensor([evaluated], dtype=torch.float64)}}, {str(out)!r})
        """
    )
    path = os.pathsep.join([str(ROOT), str(ROOT / "tests"), str(user_dir)])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": path}
    proc = subprocess.run(
        [sys.executable, "-c", child], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = load_file(out)
    iia, logits = evaluate(trained, model, eval_data)
    assert 0 < iia < 1  # a number that can differ
    assert theirs["iia"].item() == iia
    assert torch.equal(theirs["logits"], logits)
    evaluated = iv.evaluate(trained, model, [eval_data], progress=False)
    assert evaluated == pytest.approx(iia, abs=1e-6)
    assert theirs["evaluated"].item() == evaluated


# -- atomic saves -----------------------------------------------------------------------------
class Interrupted(Exception):
    pass


def _failing_write(monkeypatch, name: str) -> None:
    """The write of file ``name`` (or of the tensor file) stops half way."""
    real_atomic, real_all = serialize._write_atomic, serialize._write_all

    def half(fd, data):
        real_all(fd, data[: len(data) // 2])
        raise Interrupted(f"power cut while writing {name}")

    def atomic(path, data):
        hit = path.name == name or (name == "tensors" and path.name.startswith("tensors."))
        monkeypatch.setattr(serialize, "_write_all", half if hit else real_all)
        real_atomic(path, data)

    monkeypatch.setattr(serialize, "_write_atomic", atomic)


def _flaky_final_rename(monkeypatch) -> None:
    real_replace = os.replace

    def flaky(src, dst):
        if Path(dst).name == "program.json":  # the commit point
            raise Interrupted("power cut while renaming")
        real_replace(src, dst)

    monkeypatch.setattr(serialize.os, "replace", flaky)


def _interrupt(monkeypatch, where: str) -> None:
    if where == "final rename":
        _flaky_final_rename(monkeypatch)
    else:
        _failing_write(monkeypatch, where)


def _loads(directory: Path) -> bool:
    try:
        iv.Program.load(directory)
    except (iv.ProgramFormatError, OSError):
        return False
    return True


@pytest.mark.parametrize("where", ["tensors", "README.md", "program.json"])
def test_interrupted_save_of_a_trained_program_leaves_nothing(
    trained, tmp_path, monkeypatch, where
):
    _interrupt(monkeypatch, where)
    target = tmp_path / "program"
    with pytest.raises(Interrupted):
        trained.save(target)
    monkeypatch.undo()
    assert not target.exists() and not _loads(target)
    assert files(tmp_path) == []


@pytest.mark.parametrize("where", ["tensors", "README.md", "program.json", "final rename"])
def test_failed_overwrite_keeps_the_old_trained_program_and_card(
    trained, model, user, tmp_path, monkeypatch, where
):
    old = build(model, user)  # untrained: other weights, same graph
    target = tmp_path / "program"
    old.save(target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    _interrupt(monkeypatch, where)
    with pytest.raises(Interrupted):
        trained.save(target)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert_same_state(iv.Program.load(target), old)
    assert files(tmp_path) == ["program"]
