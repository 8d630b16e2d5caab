"""Untrusted models are data, not code (issue 17, point 5): nothing on a load path unpickles, and a chat
template from an imported model renders in a sandbox that cannot reach Python objects."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import lmforge
from lmforge.errors import InputError
from lmforge.tokenizer.chat import render_template

SOURCE = Path(lmforge.__file__).parent
# Each way Python code reads a pickle: a pickle module, torch.load (a pickle unless weights_only), numpy
# with pickles allowed, joblib/dill/shelve, and pandas' read_pickle.
UNPICKLING = re.compile(r"\bimport (c?pickle|dill|joblib|shelve)\b|\bpickle\.loads?\(|torch\.load\(|"
                        r"allow_pickle\s*=\s*True|read_pickle\(")


def test_no_load_path_unpickles():
    found = [f"{path.relative_to(SOURCE)}:{number}: {line.strip()}"
             for path in sorted(SOURCE.rglob("*.py"))
             for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             if UNPICKLING.search(line)]
    assert not found, found


def test_the_guard_sees_what_it_guards_against():
    for line in ("import pickle", "state = torch.load(path)", "np.load(f, allow_pickle=True)", "pickle.loads(data)"):
        assert UNPICKLING.search(line), line
    assert not UNPICKLING.search("np.load(path, mmap_mode='r')")


@pytest.mark.parametrize("template", [
    "{{ messages.__class__.__mro__[1].__subclasses__() }}",
    "{{ raise_exception.__globals__['os'].system('true') }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{% set x = messages.append.__self__.__class__ %}{{ x.__base__.__subclasses__() }}",
])
def test_a_template_cannot_reach_python_objects(template):
    """Jinja's sandbox refuses attribute walks to classes, globals and subclasses: an input error (or an
    empty render), never the object."""
    try:
        text = render_template(template, [{"role": "user", "content": "hi"}], True)
    except InputError as err:
        assert "chat template" in str(err)
        return
    assert "class" not in text and "function" not in text and "module" not in text, text


def test_a_template_cannot_change_the_messages_it_renders():
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(InputError, match="chat template"):
        render_template("{% set _ = messages.append({'role': 'system', 'content': 'x'}) %}ok", messages, True)
    assert messages == [{"role": "user", "content": "hi"}]


def test_names_from_files_cannot_write_outside_the_output_folder():
    """A task's name comes from its file (YAML ``name:``); the evaluation's per-task sample log is named
    after it (the whole run: tests/eval/test_eval_run.py)."""
    from lmforge.files import safe_file_name

    for name in ("../../escape", "/etc/passwd", "..", ".hidden", "a/b\\c:d", ""):
        cleaned = safe_file_name(name)
        assert "/" not in cleaned and "\\" not in cleaned and not cleaned.startswith(".") and cleaned
