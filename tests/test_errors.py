"""Errors that say what to do: one hierarchy, and messages that name the fix.

Every error tracevene raises on purpose is an ``iv.TraceveneError``; the ones that
replace a builtin error are also that builtin (``ArgumentError`` is a ``ValueError``),
so ``except ValueError`` keeps working. The source scan below keeps it that way.
"""

from __future__ import annotations

import ast
import builtins
import inspect
import re
import runpy
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import models
import tracevene as iv
from tracevene.runtime import engine as backends_base

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "tracevene"
RECIPES = ROOT / "recipes"
sys.path.insert(0, str(RECIPES))

#: Every builtin exception class: the package raises none of them bare (only the protocol
#: cases of ``allowed`` below); it raises an iv.TraceveneError subclass instead.
BUILTINS = frozenset(
    name
    for name, obj in vars(builtins).items()
    if isinstance(obj, type) and issubclass(obj, BaseException)
)


def allowed(name: str, function: ast.FunctionDef | ast.AsyncFunctionDef | None) -> bool:
    """Whether raising the builtin ``name`` inside ``function`` is a protocol, not an error.

    - ``StopIteration``, ``StopAsyncIteration``: the end of an iteration.
    - ``AttributeError`` directly in ``__getattr__``/``__getattribute__``: "no such
      attribute", which ``hasattr``, ``copy`` and ``pickle`` rely on.
    - ``NotImplementedError`` in an abstract method: a body of only a docstring and the
      ``raise``.
    """
    if name in ("StopIteration", "StopAsyncIteration"):
        return True
    if function is None:
        return False
    if name == "AttributeError":
        return function.name in ("__getattr__", "__getattribute__")
    if name == "NotImplementedError":
        body = function.body
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            body = body[1:]  # the docstring
        return len(body) == 1 and isinstance(body[0], ast.Raise)
    return False


# -- the source scan ----------------------------------------------------------------------
def builtin_raises(source: str) -> list[tuple[int, str]]:
    """``(line, name)`` of every ``raise`` of a builtin exception in ``source``.

    Catches ``raise ValueError(...)``, ``raise ValueError`` and
    ``raise builtins.ValueError(...)``, of every class in ``BUILTINS``; a bare ``raise``
    and ``raise err`` (re-raises) are fine, and so are the protocol cases of ``allowed``.
    """
    found = []

    def visit(node: ast.AST, function: ast.FunctionDef | ast.AsyncFunctionDef | None) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, child)
                continue
            if isinstance(child, ast.Raise) and child.exc is not None:
                exc = child.exc.func if isinstance(child.exc, ast.Call) else child.exc
                if isinstance(exc, ast.Attribute) and isinstance(exc.value, ast.Name):
                    name = exc.attr if exc.value.id == "builtins" else None
                else:
                    name = exc.id if isinstance(exc, ast.Name) else None
                if name in BUILTINS and not allowed(name, function):
                    found.append((child.lineno, name))
            visit(child, None if isinstance(child, ast.ClassDef) else function)

    visit(ast.parse(source), None)
    return sorted(found)


def test_the_scan_covers_every_builtin_exception():
    for name in ["ValueError", "TypeError", "KeyError", "RuntimeError", "FileExistsError",
                 "FileNotFoundError", "OSError", "ImportError", "AttributeError",
                 "IndexError", "NotImplementedError", "Exception", "BaseException",
                 "SystemExit", "AssertionError", "UserWarning", "ExceptionGroup"]:  # fmt: skip
        assert name in BUILTINS, name
    assert "TraceveneError" not in BUILTINS and "print" not in BUILTINS


def test_the_scan_catches_planted_builtin_raises():
    source = """
import builtins
from tracevene.errors import ArgumentError

def f(x):
    if x:
        raise ValueError("planted")
    try:
        pass
    except KeyError:
        raise
    if x is None:
        raise TypeError
    raise ArgumentError("fine: a tracevene error")

def g():
    raise builtins.RuntimeError("planted") from None

def h():
    raise KeyError("planted")
"""
    assert builtin_raises(source) == [(7, "ValueError"), (13, "TypeError"),
                                      (17, "RuntimeError"), (20, "KeyError")]  # fmt: skip
    assert builtin_raises("raise iv.ArgumentError('x')\nraise err\n") == []


def test_the_scan_catches_every_builtin_but_the_protocol_cases():
    source = """
def save(path):
    raise FileExistsError(f"{path} exists")

def load(path):
    try:
        open(path)
    except OSError as err:
        raise FileNotFoundError(path) from err
    raise ImportError("pip install it")

class Region:
    def _fresh(self):
        \"\"\"Abstract.\"\"\"
        raise NotImplementedError

    def todo(self):
        x = 1
        raise NotImplementedError("not yet")

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise IndexError(name)

    def other(self):
        raise AttributeError("planted")

    def __next__(self):
        raise StopIteration

    raise Exception("planted in a class body")

def main():
    raise SystemExit(2)
"""
    assert builtin_raises(source) == [
        (3, "FileExistsError"), (9, "FileNotFoundError"), (10, "ImportError"),
        (19, "NotImplementedError"), (24, "IndexError"), (27, "AttributeError"),
        (32, "Exception"), (35, "SystemExit"),
    ]  # fmt: skip


def test_the_package_raises_no_bare_builtin_errors():
    offenders = [
        f"{path.relative_to(ROOT)}:{line}: raise {name}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for line, name in builtin_raises(path.read_text())
    ]
    assert not offenders, (
        "raise an iv.TraceveneError subclass instead (ArgumentError for a ValueError, "
        "ArgumentTypeError for a TypeError, MissingKeyError for a KeyError, MissingFileError "
        "for a FileNotFoundError, PathExistsError for a FileExistsError, "
        "MissingDependencyError for an ImportError):\n" + "\n".join(offenders)
    )


# -- the hierarchy --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cls, builtin",
    [
        (iv.ArgumentError, ValueError),
        (iv.ArgumentTypeError, TypeError),
        (iv.MissingKeyError, KeyError),
        (iv.ShapeError, ValueError),
        (iv.ProgramFormatError, ValueError),
        (iv.SiteError, KeyError),
        (iv.MissingFileError, FileNotFoundError),
        (iv.PathExistsError, FileExistsError),
        (iv.MissingDependencyError, ImportError),
    ],
)
def test_errors_are_tracevene_errors_and_builtins(cls, builtin):
    assert issubclass(cls, iv.TraceveneError) and issubclass(cls, builtin)


def test_missing_key_error_is_not_quoted():
    assert str(iv.MissingKeyError("no save named 'x'")) == "no save named 'x'"


def test_converted_errors_keep_their_builtin_base_and_message():
    with pytest.raises(iv.ArgumentTypeError, match=r"iv.wrap expects a torch nn.Module, got str"):
        iv.wrap("gpt2")
    with pytest.raises(TypeError, match=r"load one by name with iv.load\(name_or_path\)"):
        iv.wrap(42)
    with pytest.raises(iv.ArgumentError, match=r"k=5 must be between 1 and d=4"):
        iv.RotatedSpace(4, 5)
    with pytest.raises(ValueError, match=r"orthogonal_map='nope': choose one of"):
        iv.RotatedSpace(4, 2, orthogonal_map="nope")


def test_a_damaged_saved_dtype_is_a_program_format_error():
    from tracevene.interventions.base import _decode

    with pytest.raises(iv.ProgramFormatError, match=r"unknown dtype 'float99'.*save the program"):
        _decode({"dtype": "float99"})
    with pytest.raises(iv.ProgramFormatError, match=r"cannot decode the saved constructor arg"):
        _decode({"what": 1})


def test_the_file_and_import_errors_keep_their_message_and_builtin_base():
    for cls in (iv.MissingFileError, iv.PathExistsError):
        error = cls("what is wrong: how to fix it")
        assert str(error) == "what is wrong: how to fix it" and error.errno is None
    assert str(iv.MissingDependencyError("pip install x")) == "pip install x"


# -- messages of the with-block -------------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    return iv.wrap(models.gpt2(), backend="torch")


def _program(model):
    with iv.trace(model) as t:
        t.layer[0].resid_post.save("h")
    return t.program


def test_saving_over_something_else_is_a_path_exists_error(model, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(
        iv.PathExistsError,
        match=rf"^{re.escape(str(tmp_path))} exists and is not a saved program; program\.save\(\) "
        r"replaces the whole directory, so it refuses to\. Save to a new directory, or remove "
        r"it first\.$",
    ):
        _program(model).save(tmp_path)
    try:
        _program(model).save(tmp_path / "notes.txt")
    except FileExistsError as e:  # except clauses written for the builtin keep working
        assert "notes.txt exists and is not a saved program" in str(e)
    else:
        raise AssertionError("saving over a file did not raise")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_the_hub_without_huggingface_hub_is_a_missing_dependency_error(model, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import raises ImportError
    with pytest.raises(
        iv.MissingDependencyError,
        match=r"^Program\.push_to_hub needs the huggingface_hub package, which is not "
        r"installed: pip install huggingface_hub \(or pip install 'tracevene\[hf\]'\)\. "
        r"Without it, program\.save\(directory\) writes the same files for any upload\.$",
    ) as info:
        _program(model).push_to_hub("alice/p")
    assert isinstance(info.value, ImportError) and info.value.__suppress_context__


def test_a_directory_without_a_saved_mlp_is_a_missing_file_error(tmp_path):
    from tracevene.models.equality import EqualityMLP

    with pytest.raises(
        iv.MissingFileError,
        match=rf"^{re.escape(str(tmp_path))} is not a saved EqualityMLP: it needs config\.json "
        r"and model\.safetensors \(write them with EqualityMLP\.save or "
        r"models/train_hierarchical_equality\.py\)\.$",
    ) as info:
        EqualityMLP.load(tmp_path)
    assert isinstance(info.value, FileNotFoundError)


def test_missing_dunder_attributes_follow_the_attribute_protocol(model):
    """``__getattr__`` answers dunders with a plain AttributeError (hasattr, copy, pickle)."""
    with iv.trace(model) as t:
        scope, value = t.layer[0], t.layer[0].resid_post
        assert not hasattr(scope, "__deepcopy__") and not hasattr(value, "__deepcopy__")
        with pytest.raises(AttributeError, match=r"^'_Scope' object has no attribute '__x__'$"):
            scope.__x__
        with pytest.raises(AttributeError, match=r"object has no attribute '__x__'$") as info:
            value.__x__
        assert info.value.name == "__x__"


def test_value_of_an_unsaved_traced_value_says_to_save(model):
    with iv.trace(model, models.tokens()) as t:
        h = t.layer[0].resid_post * 2
    with pytest.raises(
        iv.TraceError,
        match=r"^<traced value %\d+> was not saved, so it has no \.value: save it inside the "
        r"with-block \(saved = x\.save\(\), or x\.save\('name'\)\) and read saved\.value",
    ):
        h.value


def test_value_of_an_unsaved_traced_value_inside_the_block(model):
    with pytest.raises(iv.TraceError, match=r"was not saved, so it has no \.value"):
        with iv.trace(model, models.tokens()) as t:
            t.layer[0].resid_post.value


def test_a_duplicate_save_name_says_where_it_was_first_used(model):
    with pytest.raises(iv.TraceError) as info:
        with iv.trace(model, models.tokens()) as t:
            first = inspect.currentframe().f_lineno + 1
            t.layer[0].resid_post.save("x")
            t.layer[1].resid_post.save("x")
    assert re.match(
        rf"save name 'x' is already used by the save at test_errors\.py:{first}; names "
        r"must be unique within a with-block: pick another name",
        str(info.value),
    ), str(info.value)


def test_a_save_name_must_be_a_string(model):
    with pytest.raises(iv.TraceError, match=r"save names are strings, got int 3: use \.save\("):
        with iv.trace(model, models.tokens()) as t:
            t.layer[0].resid_post.save(3)


def test_a_missing_save_name_lists_the_saves(model):
    with iv.trace(model) as t:
        t.layer[0].resid_post.save("h")
    result = t.program.run(model, models.tokens())
    with pytest.raises(iv.MissingKeyError, match=r"^no save named 'nope'; named saves: h$"):
        result["nope"]


def test_a_bad_argument_inside_a_program_names_the_line(model):
    with pytest.raises(iv.ExecutionError) as info:
        with iv.trace(model, models.tokens(1, 4)) as t:
            line = inspect.currentframe().f_lineno + 1
            t.layer[1].resid_post = iv.RotatedSpace(32, 2)(t.layer[1].resid_post)
    assert re.match(
        rf"line test_errors\.py:{line}: .* failed: ArgumentError: RotatedSpace swaps values in "
        r"from a source: call it as RotatedSpace\(\.\.\.\)\(base, source\)",
        str(info.value),
    ), str(info.value)
    assert isinstance(info.value.__cause__, ValueError)


# -- iv.generate ------------------------------------------------------------------------------
def _decoding_options() -> list[str]:
    params = inspect.signature(iv.generate).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]


def test_generate_with_an_unknown_keyword_lists_the_decoding_options(model):
    with iv.trace(model) as t:
        t.layer[1].resid_post[:] += t.arg("v")
    options = _decoding_options()
    assert "max_new_tokens" in options and "at" in options
    with pytest.raises(iv.ArgumentError) as info:
        iv.generate(t.program, model, models.tokens(), v=torch.zeros(32), max_new_tokns=3)
    message = str(info.value)
    assert re.match(
        r"iv\.generate got unknown keyword\(s\) \['max_new_tokns'\] \(closest: "
        r"'max_new_tokens'\): they are neither decoding options nor placeholders",
        message,
    ), message
    assert f"The decoding options are {', '.join(options)};" in message
    assert "the program's placeholders (t.arg(name)) are v." in message
    assert isinstance(info.value, ValueError)


def test_generate_without_placeholders_says_so(model):
    with iv.trace(model) as t:
        t.layer[1].resid_post[:] += 1.0
    with pytest.raises(iv.ArgumentError, match=r"placeholders \(t\.arg\(name\)\) are none\."):
        iv.generate(t.program, model, models.tokens(), max_new_tokens=2, v=1.0)


# -- recipes: a backend that is not installed -----------------------------------------------
RECIPES_WITH_BACKEND = ["activation_patching", "causal_tracing", "das", "ioi", "path_patching"]


def _without(package: str) -> types.SimpleNamespace:
    """An ``importlib`` stand-in for tracevene.runtime.engine where ``package`` is missing."""
    real = backends_base.importlib

    def find_spec(name, *args):
        return None if name == package else real.util.find_spec(name, *args)

    return types.SimpleNamespace(
        util=types.SimpleNamespace(find_spec=find_spec), import_module=real.import_module
    )


@pytest.mark.parametrize("recipe", RECIPES_WITH_BACKEND)
@pytest.mark.parametrize(
    "backend, package, extra",
    [
        ("nnsight", "nnsight", "nnsight"),
        ("transformer_lens", "transformer_lens", "transformer-lens"),
    ],
)
def test_recipe_with_a_missing_backend_exits_2_naming_the_extra(
    recipe, backend, package, extra, monkeypatch, capsys
):
    main = runpy.run_path(str(RECIPES / f"{recipe}.py"), run_name="recipe")["main"]
    monkeypatch.setattr(backends_base, "importlib", _without(package))
    with pytest.raises(SystemExit) as info:
        main(["--smoke", "--backend", backend])
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(
        rf"error: --backend {backend}: the '{backend}' backend needs the '{package}' package: "
        rf"pip install 'tracevene\[{extra}\]'$",
        err.strip(),
    ), err


def test_causal_tracing_subject_positions_names_the_subjects():
    recipe = runpy.run_path(str(RECIPES / "causal_tracing.py"), run_name="recipe")
    with pytest.raises(
        iv.ArgumentError,
        match=r"^subject='obj' is not a subject: choose one of 'io', 'names', 's' "
        r"\(the --subject choices\)\.$",
    ):
        recipe["subject_positions"](None, "obj")


def test_recipe_script_with_a_missing_backend_prints_one_line(tmp_path):
    """The script itself: exit status 2, one line on stderr, no traceback."""
    runner = tmp_path / "run.py"
    runner.write_text(
        "import runpy, sys, types\n"
        f"sys.path.insert(0, {str(RECIPES)!r})\n"
        "import tracevene.runtime.engine as base\n"
        "real = base.importlib\n"
        "find = lambda name, *a: None if name == 'nnsight' else real.util.find_spec(name, *a)\n"
        "base.importlib = types.SimpleNamespace(\n"
        "    util=types.SimpleNamespace(find_spec=find), import_module=real.import_module)\n"
        f"sys.argv = ['activation_patching.py', '--smoke', '--backend', 'nnsight']\n"
        f"runpy.run_path({str(RECIPES / 'activation_patching.py')!r}, run_name='__main__')\n"
    )
    done = subprocess.run(
        [sys.executable, str(runner)], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    assert done.stderr == (
        "activation_patching.py: error: --backend nnsight: the 'nnsight' backend needs the "
        "'nnsight' package: pip install 'tracevene[nnsight]'\n"
    )
