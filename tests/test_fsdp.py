"""The multi-GPU recipe without launching processes (tests/test_ddp.py launches them).

- The accelerate configs of examples/accelerate/ load with accelerate's own reader and hold the settings
  examples/accelerate_multi_gpu.md gives them; the QLoRA-with-FSDP command of that page stores the 4-bit weights in
  bfloat16, which FSDP needs to shard them.
- What CC-Tuning does that sharded parameters (FSDP2, DeepSpeed ZeRO-3) constrain, checked in one process: a
  Decision Maker cast to bfloat16 (DeepSpeed's bf16 mode casts every parameter) still decides in float32; an English
  pass without any row still runs the decoder, forward and backward (every process must join the same gathers); the
  connected pass checkpoints its layers non-reentrantly when the English pass has gradients (TRL makes checkpointing
  reentrant under ZeRO-3, which then refuses a parameter whose gradient arrives twice in one backward).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch
from conftest import HIDDEN_SIZE, NUM_LAYERS
from helpers import REPO_ROOT, cc_tuner, make_batch, make_cc_model, model_inputs

from peft_cc.decision_maker import DecisionMaker, sample_gumbel_noise

CONFIGS = REPO_ROOT / "examples" / "accelerate"
PAGE = REPO_ROOT / "examples" / "accelerate_multi_gpu.md"


def _config(name: str):
    from accelerate.commands.config.config_args import load_config_from_file

    return load_config_from_file(str(CONFIGS / name))


def test_the_accelerate_configs_load_with_accelerates_reader():
    from accelerate.utils import DistributedType

    for path in sorted(CONFIGS.glob("*.yaml")):
        assert _config(path.name).distributed_type in (
            DistributedType.MULTI_GPU,
            DistributedType.FSDP,
            DistributedType.DEEPSPEED,
        ), path.name
    for name in ("fsdp2.yaml", "fsdp2_qlora.yaml"):
        fsdp = _config(name).fsdp_config
        assert fsdp["fsdp_version"] == 2
        assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"
        # accelerate 1.15's loading with `true` takes the Transform Matrix (a buffer) for a sharded parameter.
        assert fsdp["fsdp_cpu_ram_efficient_loading"] is False
        assert fsdp["fsdp_activation_checkpointing"] is False
    assert _config("fsdp2_qlora.yaml").mixed_precision == "bf16"
    zero3 = _config("deepspeed_zero3.yaml").deepspeed_config
    assert zero3["zero_stage"] == 3 and zero3["zero3_save_16bit_model"] is True and zero3["zero3_init_flag"] is True


def _page_command(config_name: str) -> list[str]:
    """The shell command of the page's `bash` blocks that launches with `config_name`, as arguments."""
    blocks = re.findall(r"^```bash\n(.*?)^```$", PAGE.read_text(encoding="utf-8"), re.DOTALL | re.MULTILINE)
    commands = [
        " ".join(line.split("#")[0].rstrip().rstrip("\\") for line in command.split("\n"))
        for block in blocks
        for command in re.split(r"\n(?=\S)", block.strip())
    ]
    matching = [command for command in commands if config_name in command]
    assert len(matching) == 1, f"{PAGE.name}: {len(matching)} commands launch with {config_name}"
    return shlex.split(matching[0])


def test_the_qlora_with_fsdp_command_stores_the_4bit_weights_in_bfloat16(monkeypatch):
    from trl import get_quantization_config

    from peft_cc.scripts.sft import parse_args

    command = _page_command("fsdp2_qlora.yaml")
    assert command[:3] == ["accelerate", "launch", "--config_file"]
    assert command[command.index("-m") + 1 : command.index("-m") + 3] == ["peft_cc.cli", "sft"]
    argv = command[command.index("-m") + 3 :]
    monkeypatch.chdir(REPO_ROOT)
    # TrainingArguments refuses bf16 on a machine without a GPU unless told to run on the CPU.
    script_args, training_args, model_args, cc_args = parse_args([*argv, "--use_cpu", "true"])
    quantization = get_quantization_config(model_args)
    assert quantization.load_in_4bit
    assert quantization.bnb_4bit_quant_storage == torch.bfloat16
    assert quantization.bnb_4bit_compute_dtype == torch.bfloat16
    assert training_args.gradient_checkpointing and cc_args.method == "cc"


def test_a_decision_maker_cast_to_bfloat16_still_decides_in_float32():
    """DeepSpeed's bf16 mode casts every parameter, the Decision Maker's too; its logits stay float32 and its weight
    gets a gradient."""
    torch.manual_seed(0)
    decision_maker = DecisionMaker(NUM_LAYERS, HIDDEN_SIZE)
    reference = decision_maker.weight.detach().clone()
    decision_maker.to(torch.bfloat16)
    z = torch.randn(4, HIDDEN_SIZE)
    choice, logits = decision_maker(z, sample_gumbel_noise(4, NUM_LAYERS, z.device))
    assert logits.dtype == choice.dtype == torch.float32
    torch.testing.assert_close(logits, z @ reference.to(torch.bfloat16).float().T)
    assert torch.equal(choice.detach().sum(dim=-1), torch.ones(4))
    (choice * torch.arange(NUM_LAYERS)).sum().backward()
    assert decision_maker.weight.grad is not None and decision_maker.weight.grad.dtype == torch.bfloat16
    assert torch.any(decision_maker.weight.grad != 0)


@pytest.mark.parametrize("with_autograd", [True, False])
def test_an_english_pass_without_rows_still_runs_the_decoder(with_autograd):
    """No row to connect: the decoder still runs (on one token), and with gradients its backward still reaches the
    English layers, so that under FSDP2 or ZeRO-3 this process joins the gathers and reductions of the others."""
    model = make_cc_model("llama", lora_dropout=0.0)
    tuner = cc_tuner(model)
    calls = []
    handle = tuner.model.get_decoder().register_forward_pre_hook(lambda module, args: calls.append(1))
    batch = make_batch()
    none = torch.zeros(0, dtype=torch.long)
    activations = tuner.anchor_activations(
        batch["input_ids"], batch["attention_mask"], none, none, list(range(NUM_LAYERS)), with_autograd
    )
    handle.remove()
    assert calls == [1]
    assert activations.shape == (0, NUM_LAYERS, HIDDEN_SIZE)
    assert activations.requires_grad == with_autograd
    if with_autograd:
        activations.sum().backward()
        top = tuner.decoder().layers[-1]
        grads = [param.grad for name, param in top.named_parameters() if "lora_A" in name]
        assert grads and all(grad is not None and not torch.any(grad) for grad in grads)


@pytest.mark.parametrize("english_gradients", [True, False])
def test_the_connected_pass_checkpoints_non_reentrantly_after_an_english_pass_with_gradients(english_gradients):
    model = make_cc_model("llama", english_gradients=english_gradients)
    model.base_model.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    layer = cc_tuner(model).decoder().layers[1]
    seen = []
    handle = layer.register_forward_pre_hook(
        lambda module, args: seen.append(module._gradient_checkpointing_func.keywords["use_reentrant"])
    )
    model(**model_inputs(make_batch())).loss.backward()
    handle.remove()
    # The English pass, then the connected pass.
    assert seen == ([False, False] if english_gradients else [True, True])
    assert layer._gradient_checkpointing_func.keywords["use_reentrant"] is True  # restored


def test_the_page_names_only_configs_that_exist():
    for name in re.findall(r"examples/accelerate/([\w.-]+\.yaml)", PAGE.read_text(encoding="utf-8")):
        assert Path(CONFIGS / name).is_file(), name
