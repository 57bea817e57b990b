"""The CC-Tuning vs LoRA A/B recipe of examples/ab_8b_qlora/: its configs, its data preparation, its evaluation plan,
its XQuAD tasks and, end to end on the CPU, the whole recipe (the same script and configs; the scale and the sources
changed as its README's "What the toy test changes" lists) on a tiny random Llama and the offline stand-ins of
Bactrian-X and lm-eval's datasets."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from fixtures.offline_hub import (
    BACTRIAN_X_EMPTY_OUTPUTS,
    RECIPE_LANGUAGES,
    bactrian_x_rows,
    write_bactrian_x,
    write_offline_lm_eval,
)
from transformers import LlamaConfig, LlamaForCausalLM

from peft_cc.lm_eval.comparison import find_results_file

RECIPE_DIR = Path(__file__).resolve().parents[1] / "examples" / "ab_8b_qlora"
_spec = importlib.util.spec_from_file_location("ab_recipe", RECIPE_DIR / "ab_recipe.py")
ab_recipe = sys.modules.setdefault("ab_recipe", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(ab_recipe)

ROWS_PER_LANGUAGE = 8
# What the toy run changes, and only that (the README's "What the toy test changes" explains each): the model and the
# sources, the data's and the evaluation's scale, the device with its float32 arithmetic, and the batch of lm-eval.
TOY_SCALE = [
    "--rows-per-language", str(ROWS_PER_LANGUAGE),
    "--items", "xnli=2,xstorycloze=2,global_mmlu=2,xquad_gold_nll=2,xquad=2",
    "--mmlu-subjects", "anatomy,astronomy",
    "--eval-batch-size", "32",
    "--sft-args", "--use_cpu true --dtype float32 --bf16 false --max_steps 2 --per_device_train_batch_size 2 "
    "--gradient_accumulation_steps 1 --transform_pairs 8",
    "--lm-eval-args", "--gen_kwargs max_gen_toks=8",
]  # fmt: skip


def test_the_two_configs_differ_only_in_the_model_and_set_up_qlora():
    configs = {name: yaml.safe_load(path.read_text(encoding="utf-8")) for name, path in ab_recipe.CONFIGS.items()}
    llama, qwen = configs["llama"], configs["qwen"]
    assert llama.pop("model_name_or_path") == "meta-llama/Llama-3.1-8B-Instruct"
    assert qwen.pop("model_name_or_path") == "Qwen/Qwen2.5-7B-Instruct"
    assert llama == qwen
    expected = {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "use_bnb_nested_quant": True,
        "dtype": "bfloat16",
        "bf16": True,
        "gradient_checkpointing": True,
        "gradient_checkpointing_kwargs": {"use_reentrant": False},
        "optim": "paged_adamw_8bit",
        "lora_r": 16,
        "lora_alpha": 32,
        "transform_pairs": 1000,
        "max_length": 1024,
    }
    assert {key: llama[key] for key in expected} == expected
    assert "lora_target_modules" not in llama and "method" not in llama  # all linear layers; the script sets the arm


@pytest.mark.parametrize("model", ["llama", "qwen"])
def test_peft_cc_sft_parses_each_config_for_both_arms(model, tmp_path):
    from peft_cc.scripts.sft import adapter_config, parse_args

    for method in ("lora", "cc"):
        argv = ["--config", str(ab_recipe.CONFIGS[model]), "--method", method, "--use_cpu", "true"]
        script_args, training_args, model_args, cc_args = parse_args(
            [*argv, "--dataset_name", str(tmp_path / "train.jsonl"), "--output_dir", str(tmp_path / method)]
        )
        assert model_args.model_name_or_path.startswith("Qwen/" if model == "qwen" else "meta-llama/")
        assert training_args.gradient_checkpointing_kwargs == {"use_reentrant": False}
        assert training_args.transform_pairs == 1000 and training_args.per_device_train_batch_size == 4
        adapter = adapter_config(model_args, cc_args)
        assert (adapter.r, adapter.lora_alpha, adapter.target_modules) == (16, 32, "all-linear")
        assert type(adapter).__name__ == ("LoraConfig" if method == "lora" else "CCConfig")


def test_the_qwen_plan_names_qwen_and_runs_nothing(tmp_path, capsys):
    out = tmp_path.resolve() / "ab-qwen"
    assert ab_recipe.main(["--model", "qwen", "--output-dir", str(out), "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "Qwen/Qwen2.5-7B-Instruct (config qwen2.5-7b-instruct.yaml)" in plan
    assert plan.count("qwen2.5-7b-instruct.yaml --method") == 2  # both arms, one config
    assert f"pretrained={out}/base-nf4,dtype=bfloat16,peft={out}/adapters/cc,connection=monolingual" in plan
    assert "items per language: xnli 938, xstorycloze 862, global_mmlu 570, xquad_gold_nll 122, xquad 122" in plan
    assert not out.exists()


def test_the_data_is_joined_by_id_in_chat_form_without_empty_outputs(tmp_path, capsys):
    root = write_bactrian_x(tmp_path / "hub", languages=("en", "ru", "zh"), rows=40)
    summary = ab_recipe.prepare_training_data(str(root), ["ru", "zh"], 30, seed=3, folder=tmp_path / "data")
    rows = [json.loads(line) for line in (tmp_path / "data" / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 60 and summary["rows"] == 60
    assert summary["languages"]["ru"] == {
        "rows": 40,
        "dropped_no_english_original": 0,
        "dropped_empty_output": len(BACTRIAN_X_EMPTY_OUTPUTS),
        "used": 30,
    }
    english = {row["id"]: row for row in bactrian_x_rows("en", 40)}
    originals = {(language, row["id"]): row for language in ("ru", "zh") for row in bactrian_x_rows(language, 40)}
    for row in rows:
        original, source = originals[row["language"], row["id"]], english[row["id"]]
        assert row["prompt"][0]["role"] == "user" and row["completion"][0]["role"] == "assistant"
        assert row["completion"][0]["content"] == original["output"] != ""
        assert row["prompt"][0]["content"] == ab_recipe.user_turn(original["instruction"], original["input"])
        assert row["prompt_en"][0]["content"] == ab_recipe.user_turn(source["instruction"], source["input"])
    assert ("ru", "dolly-4") not in {(row["language"], row["id"]) for row in rows}
    assert ab_recipe.user_turn("Rewrite it.", " Text. ") == "Rewrite it.\n\nText."
    assert [row["language"] for row in rows] != sorted(row["language"] for row in rows)  # languages shuffled together
    again = ab_recipe.prepare_training_data(str(root), ["ru", "zh"], 30, seed=3, folder=tmp_path / "again")
    assert again == summary
    assert (tmp_path / "again" / "train.jsonl").read_bytes() == (tmp_path / "data" / "train.jsonl").read_bytes()
    with pytest.raises(ab_recipe.RecipeError, match="No Bactrian-X file for the language 'hi'"):
        ab_recipe.prepare_training_data(str(root), ["hi"], 30, seed=3, folder=tmp_path / "missing")


def test_settings_it_cannot_use_are_refused_with_the_fix(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert ab_recipe.main(["--model", "llama", "--output-dir", out, "--languages", "ar,xx", "--dry-run"]) == 2
    assert "xx not in Bactrian-X" in capsys.readouterr().err
    assert ab_recipe.main(["--model", "llama", "--output-dir", out, "--items", "mkqa=10", "--dry-run"]) == 2
    assert "BENCHMARK one of xnli, xstorycloze, global_mmlu, xquad_gold_nll, xquad" in capsys.readouterr().err
    assert ab_recipe.main(["--model", "llama", "--output-dir", out, "--mmlu-subjects", "cooking", "--dry-run"]) == 2
    assert "cooking not among Global-MMLU's subjects" in capsys.readouterr().err


def test_a_model_without_a_chat_template_and_a_missing_stage_output_are_refused(tmp_path, capsys):
    from sft_helpers import make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer()
    tokenizer.save_pretrained(tmp_path / "chat")
    tokenizer.chat_template = None
    tokenizer.save_pretrained(tmp_path / "plain")
    out = str(tmp_path / "out")
    argv = ["--model", "llama", "--output-dir", out, "--stages", "train-lora", "--base-model"]
    assert ab_recipe.main([*argv, str(tmp_path / "plain")]) == 2
    assert "has no chat template" in capsys.readouterr().err
    assert ab_recipe.main([*argv, str(tmp_path / "chat")]) == 2
    assert "run the stage prepare first (--stages prepare)" in capsys.readouterr().err


def test_the_evaluation_plan_pools_non_english_languages_and_sizes_subjects():
    items = {"xnli": 900, "xstorycloze": 900, "global_mmlu": 912, "xquad_gold_nll": 125, "xquad": 0}
    plan = ab_recipe.evaluation_plan(["ar", "de"], items, ["anatomy", "astronomy"], frozenset({"en", "ar", "de"}))
    assert plan.tasks == [
        "ab_xnli", "xnli_en", "ab_xstorycloze", "xstorycloze_en", "ab_global_mmlu", "ab_global_mmlu_en",
        "ab_xquad_gold_nll", "xquad_gold_nll_en",
    ]  # fmt: skip
    assert plan.groups["ab_xnli"]["task"] == ["xnli_ar", "xnli_de"]
    assert plan.groups["ab_xstorycloze"]["task"] == ["xstorycloze_ar"]  # XStoryCloze has no German
    assert plan.notes == ["xstorycloze has no de: not evaluated there"]
    assert plan.groups["ab_global_mmlu"]["task"] == ["ab_global_mmlu_ar", "ab_global_mmlu_de"]
    assert plan.groups["ab_global_mmlu_en"]["task"] == ["global_mmlu_full_en_anatomy", "global_mmlu_full_en_astronomy"]
    assert plan.samples["global_mmlu_full_de_astronomy"] == list(range(456))
    assert plan.samples["xnli_de"] == list(range(900)) and "xquad_en" not in plan.samples  # 0 items: left out
    assert plan.items_per_language == {"xnli": 900, "xstorycloze": 900, "global_mmlu": 912, "xquad_gold_nll": 125}
    assert plan.groups["ab_xquad_gold_nll"]["aggregate_metric_list"][0]["metric"] == "answer_nll"


def test_the_gold_likelihood_tasks_are_the_xquad_tasks_with_one_log_likelihood_each():
    from lm_eval.tasks._yaml_loader import load_yaml

    tasks = ab_recipe.TASKS_DIR
    for language in ("en", "ar", "es", "hi", "ru", "zh"):
        generative = load_yaml(tasks / f"xquad_{language}.yaml", resolve_func=False)
        likelihood = load_yaml(tasks / f"xquad_gold_nll_{language}.yaml", resolve_func=False)
        changed = {"task", "tag", "class", "output_type", "process_results", "generation_kwargs", "metric_list"}
        assert {key for key in {*generative, *likelihood} if generative.get(key) != likelihood.get(key)} == changed
        assert likelihood["output_type"] == "loglikelihood" and likelihood["task"] == f"xquad_gold_nll_{language}"
        assert likelihood["metric_list"] == [
            {"metric": "answer_nll", "aggregation": "mean", "higher_is_better": False}
        ]


def make_toy_model(tokenizer, folder: Path) -> Path:
    """A tiny random Llama (2 layers, 64 wide: the narrowest bitsandbytes' CPU 4-bit kernels take) with SmolLM2's
    tokenizer and chat template, saved to `folder`."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_the_recipe_runs_end_to_end_on_a_tiny_model(smollm2_tokenizer, tmp_path, monkeypatch, capfd):
    """prepare, train-lora, train-cc, quantize, eval-base, eval-lora, eval-cc and compare, as on a GPU but smaller;
    then a second run skips every finished stage, and a run with other data settings is refused."""
    for name, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
        monkeypatch.setenv(name, value)
    model = make_toy_model(smollm2_tokenizer, tmp_path / "tiny-llama")
    bactrian = write_bactrian_x(tmp_path / "hub", languages=RECIPE_LANGUAGES, rows=40)
    offline = write_offline_lm_eval(tmp_path / "lm_eval", languages=RECIPE_LANGUAGES, rows_per_language=4)
    out = tmp_path / "ab"
    argv = [
        "--model", "llama", "--output-dir", str(out), "--base-model", str(model), "--source", str(bactrian),
        "--task-dir", str(offline.task_dir), *TOY_SCALE,
    ]  # fmt: skip

    start = time.monotonic()
    status = ab_recipe.main(argv)
    seconds = time.monotonic() - start
    output = capfd.readouterr()
    assert status == 0, output.err[-4000:]
    with capfd.disabled():
        print(f"\nthe toy recipe (8 stages) took {seconds:.0f} s")

    summary = json.loads((out / "data" / "summary.json").read_text(encoding="utf-8"))
    assert summary["rows"] == ROWS_PER_LANGUAGE * len(ab_recipe.DEFAULT_LANGUAGES)
    lora = json.loads((out / "adapters" / "lora" / "adapter_config.json").read_text(encoding="utf-8"))
    cc = json.loads((out / "adapters" / "cc" / "adapter_config.json").read_text(encoding="utf-8"))
    assert (lora["peft_type"], cc["peft_type"], lora["r"], cc["r"]) == ("LORA", "CC", 16, 16)
    assert set(lora["target_modules"]) == set(cc["target_modules"])  # the same layers: all linear ones
    quantized = json.loads((out / "base-nf4" / "config.json").read_text(encoding="utf-8"))["quantization_config"]
    assert (quantized["bnb_4bit_quant_type"], quantized["bnb_4bit_use_double_quant"]) == ("nf4", True)
    results = {
        system: json.loads(find_results_file(out / "eval" / system).read_text(encoding="utf-8"))
        for system in ("base", "lora", "cc")
    }
    assert results["cc"]["config"]["model_args"]["connection"] == "monolingual"
    assert results["cc"]["configs"]["xquad_gold_nll_hi"]["dataset_path"] == str(offline.dataset_dirs["xquad"])

    leaves = {
        f"{benchmark}_{language}"
        for benchmark in ("xnli", "xstorycloze", "xquad", "xquad_gold_nll")
        for language in RECIPE_LANGUAGES
    } | {
        f"global_mmlu_full_{language}_{subject}"
        for language in RECIPE_LANGUAGES
        for subject in ("anatomy", "astronomy")
    }
    pooled = {f"ab_{name}" for name in ab_recipe.BENCHMARK_NAMES}
    for name, _, _ in ab_recipe.COMPARISONS:
        comparison = json.loads((out / "compare" / f"{name}.json").read_text(encoding="utf-8"))
        tasks = {row["name"] for row in comparison["rows"] if row["kind"] == "task"}
        groups = {row["name"] for row in comparison["rows"] if row["kind"] == "group"}
        assert tasks == leaves and pooled <= groups
        metrics = {row["metric_name"] for row in comparison["rows"] if row["name"] == "ab_xquad_gold_nll"}
        assert metrics == {"answer_nll"}
        assert (out / "compare" / f"{name}.png").stat().st_size > 0
        assert "> 2 SE" in (out / "compare" / f"{name}.txt").read_text(encoding="utf-8")
    assert "cc - lora   ab_xquad_gold_nll answer_nll" in output.out

    assert ab_recipe.main([*argv, "--stages", "prepare,train,quantize,eval"]) == 0
    assert capfd.readouterr().out.count("done before") == 7
    assert ab_recipe.main([*argv, "--rows-per-language", "6", "--stages", "prepare"]) == 2
    assert "Stage prepare was run" in (refused := capfd.readouterr().err) and "rows_per_language differ" in refused
