"""Saving and loading a CC-Tuning adapter: files, keys, a fresh process, mismatched bases, push_to_hub."""

import json
import os
from pathlib import Path
from unittest import mock

import huggingface_hub
import peft
import pytest
import torch
from conftest import _COMMON, HIDDEN_SIZE, make_tiny_model
from helpers import (
    ADAPTER,
    cc_tuner,
    decision_maker_weight,
    make_batch,
    make_cc_model,
    model_inputs,
    run_python,
    train_step,
    trainable_parameters,
)
from huggingface_hub.errors import EntryNotFoundError
from safetensors import safe_open
from safetensors.torch import load as load_safetensors
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

SAVE_ARCHITECTURES = ("llama", "gemma3")
DM_KEY = "base_model.cc_decision_maker.weight"
TM_KEY = "base_model.cc_transform_matrix"


def _trained_adapter(root, architecture):
    """Train one step from a saved base, set a random Transform Matrix, save the adapter and reference outputs."""
    base_dir, adapter_dir = root / "base", root / "adapter"
    make_tiny_model(architecture).save_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = make_cc_model(architecture, base=base)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        cc_tuner(model).cc_transform_matrix[ADAPTER].copy_(torch.randn(HIDDEN_SIZE, HIDDEN_SIZE, generator=generator))
    initial_dm = decision_maker_weight(model).detach().clone()
    optimizer = torch.optim.SGD(trainable_parameters(model).values(), lr=0.5)
    train_step(model, make_batch(seed=3))
    optimizer.step()
    optimizer.zero_grad()
    assert not torch.equal(decision_maker_weight(model), initial_dm)

    model.eval()
    batch = model_inputs(make_batch(prompt_lens=(4, 6, 3), response_lens=(3, 2, 4), english_lens=(5, 3, 6), seed=9))
    with torch.no_grad():
        connected = model(**batch).logits
        plain = model(**{k: v for k, v in batch.items() if not k.startswith("english_")}).logits
    model.save_pretrained(adapter_dir)
    reference = dict(
        connected=connected,
        plain=plain,
        decision_maker=decision_maker_weight(model).detach().clone(),
        transform_matrix=cc_tuner(model).cc_transform_matrix[ADAPTER].clone(),
        **{f"batch.{key}": value for key, value in batch.items()},
    )
    torch.save(reference, root / "reference.pt")
    return dict(model=model, base_dir=base_dir, adapter_dir=adapter_dir, reference=reference)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """architecture -> a trained, saved adapter (see `_trained_adapter`)."""
    return {arch: _trained_adapter(tmp_path_factory.mktemp(arch), arch) for arch in SAVE_ARCHITECTURES}


_LOAD_IN_FRESH_PROCESS = r"""
import json, sys
import torch
import peft_cc
from peft import AutoPeftModelForCausalLM, PeftModel
from transformers import AutoModelForCausalLM

results = {}
for arch, root in json.loads(sys.argv[1]).items():
    reference = torch.load(f"{root}/reference.pt", weights_only=True)
    batch = {key[len("batch."):]: value for key, value in reference.items() if key.startswith("batch.")}
    plain_batch = {key: value for key, value in batch.items() if not key.startswith("english_")}
    loaded = {
        "PeftModel": lambda: PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(f"{root}/base", dtype=torch.float32), f"{root}/adapter"
        ),
        "AutoPeftModelForCausalLM": lambda: AutoPeftModelForCausalLM.from_pretrained(f"{root}/adapter"),
    }
    for loader, load in loaded.items():
        model = load().eval()
        tuner = model.base_model
        decision_maker = tuner.cc_decision_maker["default"].weight
        transform_matrix = tuner.cc_transform_matrix["default"]
        with torch.no_grad():
            connected = model(**batch).logits
            plain = model(**plain_batch).logits
        results[f"{arch}/{loader}"] = {
            "tuner": type(tuner).__name__,
            "is_cc_model": isinstance(tuner, peft_cc.CCModel),
            "is_cc_config": isinstance(model.peft_config["default"], peft_cc.CCConfig),
            "dtype": str(connected.dtype),
            "connected_diff": (connected - reference["connected"]).abs().max().item(),
            "plain_diff": (plain - reference["plain"]).abs().max().item(),
            "decision_maker_equal": torch.equal(decision_maker, reference["decision_maker"]),
            "transform_matrix_equal": torch.equal(transform_matrix, reference["transform_matrix"]),
            "decision_maker_dtype": str(decision_maker.dtype),
        }
print("RESULTS " + json.dumps(results))
"""


@pytest.fixture(scope="module")
def fresh_process_results(saved):
    """Load every saved adapter in one fresh interpreter (both loaders) and return what it measured."""
    roots = {arch: str(info["base_dir"].parent) for arch, info in saved.items()}
    output = run_python(_LOAD_IN_FRESH_PROCESS, json.dumps(roots))
    line = next(line for line in output.splitlines() if line.startswith("RESULTS "))
    return json.loads(line[len("RESULTS ") :])


@pytest.mark.parametrize("architecture", SAVE_ARCHITECTURES)
def test_saved_files(saved, architecture):
    """adapter_config.json says peft_type CC; the weights are LoRA, the Decision Maker and the Transform Matrix."""
    info = saved[architecture]
    # The reference outputs are meaningful: the connection changes the logits.
    assert (info["reference"]["connected"] - info["reference"]["plain"]).abs().max() > 1e-3
    config = json.loads((info["adapter_dir"] / "adapter_config.json").read_text())
    assert config["peft_type"] == "CC"
    assert config["base_model_name_or_path"] == str(info["base_dir"])

    model = info["model"]
    lora_params = {
        name.replace(f".{ADAPTER}.", "."): param for name, param in model.named_parameters() if "lora_" in name
    }
    with safe_open(info["adapter_dir"] / "adapter_model.safetensors", "pt") as file:
        keys = set(file.keys())
        assert DM_KEY in keys and TM_KEY in keys
        assert keys == set(lora_params) | {DM_KEY, TM_KEY}  # adapter name stripped, nothing of the base model
        assert all(f".{ADAPTER}" not in key for key in keys)
        assert torch.equal(file.get_tensor(DM_KEY), info["reference"]["decision_maker"])
        assert torch.equal(file.get_tensor(TM_KEY), info["reference"]["transform_matrix"])
        assert file.get_tensor(TM_KEY).abs().sum() > 0
        for key, param in lora_params.items():
            assert torch.equal(file.get_tensor(key), param.detach()), key


@pytest.mark.parametrize("loader", ["PeftModel", "AutoPeftModelForCausalLM"])
@pytest.mark.parametrize("architecture", SAVE_ARCHITECTURES)
def test_load_in_fresh_process(fresh_process_results, architecture, loader):
    """A fresh process that imports peft_cc reloads the adapter: same logits, Decision Maker, Transform Matrix."""
    result = fresh_process_results[f"{architecture}/{loader}"]
    assert result["is_cc_model"] and result["is_cc_config"], result
    assert result["dtype"] == "torch.float32"
    assert result["decision_maker_dtype"] == "torch.float32"
    assert result["decision_maker_equal"] and result["transform_matrix_equal"], result
    assert result["connected_diff"] <= 1e-5, result
    assert result["plain_diff"] <= 1e-5, result


@pytest.mark.parametrize("is_trainable", [False, True])
def test_load_trainable_or_not(saved, is_trainable):
    """is_trainable decides whether the loaded Decision Maker trains; the Transform Matrix never does."""
    model = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(saved["llama"]["base_dir"]),
        saved["llama"]["adapter_dir"],
        is_trainable=is_trainable,
    )
    assert decision_maker_weight(model).requires_grad is is_trainable
    assert not cc_tuner(model).cc_transform_matrix[ADAPTER].requires_grad
    assert torch.equal(decision_maker_weight(model), saved["llama"]["reference"]["decision_maker"])


def test_load_with_low_cpu_mem_usage(saved):
    """PeftModel.from_pretrained(..., low_cpu_mem_usage=True) loads the adapter and gives the same logits."""
    info = saved["llama"]
    model = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(info["base_dir"]), info["adapter_dir"], low_cpu_mem_usage=True
    ).eval()
    batch = {key[len("batch.") :]: v for key, v in info["reference"].items() if key.startswith("batch.")}
    with torch.no_grad():
        logits = model(**batch).logits
    torch.testing.assert_close(logits, info["reference"]["connected"], atol=1e-5, rtol=0)
    assert torch.equal(decision_maker_weight(model), info["reference"]["decision_maker"])


def _llama(**overrides):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**_COMMON, **overrides})).eval()


@pytest.mark.parametrize(
    "overrides",
    [dict(hidden_size=64), dict(num_hidden_layers=4), dict(num_hidden_layers=2)],
    ids=["hidden-64", "4-layers", "2-layers"],
)
def test_load_onto_another_base_fails(saved, overrides):
    """An adapter (all layers as candidates) refuses a base of another width or depth, saying why."""
    with pytest.raises(ValueError, match=r"trained for another base model"):
        peft.PeftModel.from_pretrained(_llama(**overrides), saved["llama"]["adapter_dir"])


@pytest.mark.filterwarnings("ignore:Found missing adapter keys")
@pytest.mark.parametrize("num_layers", [2, 4])
def test_load_with_explicit_source_layers_onto_another_depth_fails(tmp_path, num_layers):
    """An adapter with source_layers=[1] trained on 3 layers must not load silently onto a base of another depth."""
    make_cc_model("llama", source_layers=[1]).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"trained for another base model.*(has no module|lacks [1-9])"):
        peft.PeftModel.from_pretrained(_llama(num_hidden_layers=num_layers), tmp_path)


@pytest.fixture
def pushed_files():
    """Push a CC adapter with the Hub's HTTP calls replaced at their boundary; return path_in_repo -> bytes."""
    model = make_cc_model("llama")
    uploaded = {}

    def create_commit(self, repo_id, operations, **kwargs):
        assert repo_id == "user/repo"
        for operation in operations:
            source = operation.path_or_fileobj
            if isinstance(source, (str, os.PathLike)):
                source = Path(source).read_bytes()  # the temporary folder is gone after push_to_hub returns
            elif not isinstance(source, bytes):
                source = source.read()
            uploaded[operation.path_in_repo] = source
        return huggingface_hub.CommitInfo(
            commit_url="https://huggingface.co/user/repo/commit/0",
            commit_message="Upload model",
            commit_description="",
            oid="0" * 40,
        )

    repo_url = huggingface_hub.RepoUrl("https://huggingface.co/user/repo")
    with (
        mock.patch.object(huggingface_hub.HfApi, "create_repo", return_value=repo_url) as create_repo,
        mock.patch.object(huggingface_hub.HfApi, "create_commit", create_commit),
        # A new repository has no model card yet.
        mock.patch.object(huggingface_hub.ModelCard, "load", side_effect=EntryNotFoundError("no README.md")),
    ):
        model.push_to_hub("user/repo", token="x")
    create_repo.assert_called_once()
    return uploaded


def test_push_to_hub_uploads_the_adapter(pushed_files):
    """push_to_hub uploads adapter_config.json (peft_type CC) and the adapter weights with the CC tensors."""
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(pushed_files)
    assert json.loads(pushed_files["adapter_config.json"])["peft_type"] == "CC"
    tensors = load_safetensors(pushed_files["adapter_model.safetensors"])
    assert DM_KEY in tensors and TM_KEY in tensors
