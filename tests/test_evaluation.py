"""The evaluator end to end: a tiny random model with the real SmolLM2 tokenizer, on a benchmark layout written here
(so the code runs on any copy of the layout), a CC-Tuning adapter's connections, the reports, and the command line
on the real benchmark samples."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import REPO_ROOT, fit_random_transform, make_cc_model, randomize_lora_b
from transformers import LlamaConfig, LlamaForCausalLM

from peft_cc.anchors import position_ids_from_attention_mask
from peft_cc.evaluation import EvaluationConfig, evaluate, load_results, load_system, write_report
from peft_cc.evaluation.__main__ import main
from peft_cc.evaluation.loading import adapter_base_model
from peft_cc.evaluation.option_scoring import option_log_likelihoods
from peft_cc.evaluation.prompts import encode_prompt, left_pad, uses_chat_template
from peft_cc.evaluation.report import markdown_report
from peft_cc.parallel_data import load_parallel_items

REAL_DATA_ROOT = os.environ.get("PEFT_CC_BENCHMARKS", str(REPO_ROOT.parent / "shared" / "data" / "benchmarks"))

# Four hand-made items per language; multiple-choice gold labels chosen so that the majority rates are known.
LAYOUT = {
    "XNLI": {
        "en": [
            (f"Premise: p{i}\nHypothesis: h{i}\n(1) Entail\n(2) Neutral\n(3) Contradict\nAnswer:", g)
            for i, g in enumerate(["1", "2", "2", "3"])
        ],
        "zh": [
            (f"前提：p{i}\n假设：h{i}\n(1) 蕴涵\n(2) 中立\n(3) 矛盾\n答案：", g)
            for i, g in enumerate(["1", "2", "2", "3"])
        ],
    },
    "XStoryCloze": {
        "en": [
            (f"Story {i}.\n(1) End one.\n(2) End two.\nYour answer:", g) for i, g in enumerate(["2", "1", "2", "2"])
        ],
        "es": [(f"Historia {i}.\n(1) Uno.\n(2) Dos.\nTu respuesta:", g) for i, g in enumerate(["2", "1", "2", "2"])],
    },
    "MMMLU": {
        "en": [(f"Question {i}?\n(A) a\n(B) b\n(C) c\n(D) d\nAnswer:", g) for i, g in enumerate("ABCD")],
        "ko": [(f"질문 {i}?\n(A) a\n(B) b\n(C) c\n(D) d\n답:", g) for i, g in enumerate("ABCD")],
    },
    "XQuAD": {
        "en": [(f"Context: The number is {i}08.\nQuestion: Which number?\nYour answer:", f"{i}08") for i in range(4)],
        "th": [(f"บริบท: ตัวเลขคือ {i}08\nคำถาม: ตัวเลขอะไร\nคำตอบ:", f"{i}08") for i in range(4)],
    },
    "MKQA": {
        "en": [(f"Please answer: question {i}\nYour answer:", [f"answer {i}", f"{i}.0"]) for i in range(4)],
        "ja": [(f"質問に答えてください：質問{i}\n答え：", [f"答え{i}"]) for i in range(4)],
    },
    "XLSum": {
        "en": [
            (f"Summarize in one sentence.\nArticle {i}: the weather was fine.", f"Weather {i} fine.") for i in range(4)
        ],
        "fr": [(f"Résumez en une phrase.\nArticle {i} : il faisait beau.", f"Beau temps {i}.") for i in range(4)],
    },
}


def _write_jsonl(path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """A benchmark layout of hand-made items (XLSum with its `prompts_en` English renderings)."""
    root = tmp_path_factory.mktemp("benchmarks")
    for benchmark, languages in LAYOUT.items():
        for language, items in languages.items():
            _write_jsonl(root / benchmark / "prompts" / f"{language}.jsonl", [{"prompt": p} for p, _ in items])
            _write_jsonl(root / benchmark / "answers" / f"{language}.jsonl", [answer for _, answer in items])
            if benchmark == "XLSum":
                english = [{"prompt": f"English rendering of {language} article {i}."} for i in range(len(items))]
                _write_jsonl(root / benchmark / "prompts_en" / f"{language}.jsonl", english)
    return root


def _tiny_model(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    """A tiny random Llama (2 layers, d=16) whose vocabulary matches a real tokenizer's, in eval mode."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer):
    return smollm2_tokenizer


@pytest.fixture
def tiny_model(tokenizer):
    return _tiny_model(len(tokenizer))


def _tiny_cc_model(tokenizer, fitted: bool = True):
    model = make_cc_model("llama", base=_tiny_model(len(tokenizer)), train=False)
    randomize_lora_b(model, std=0.5)
    if fitted:
        fit_random_transform(model, scale=3.0)
    return model


# ------------------------------------------------------------------------------------------------ prompts


def test_prompts_use_the_chat_template_where_there_is_one(tokenizer):
    templated = encode_prompt(tokenizer, "Hello?", chat_template=True)
    assert tokenizer.decode(templated).endswith("Hello?<|im_end|>\n<|im_start|>assistant\n")
    assert encode_prompt(tokenizer, "Hello?", chat_template=False) == tokenizer("Hello?")["input_ids"]
    assert uses_chat_template(tokenizer) and not uses_chat_template(tokenizer, chat_template=False)

    batch = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


# ------------------------------------------------------------------------------------------------ option scoring


@pytest.mark.parametrize("connection", ["off", "monolingual", "bilingual"])
def test_option_log_likelihoods_equal_unbatched_forwards(connection):
    """Batched, left-padded, de-duplicated scoring equals one unpadded forward per (prompt, option), connection
    included, for options of one and of several tokens."""
    model = make_cc_model("llama", train=False)
    randomize_lora_b(model, std=0.2)
    fit_random_transform(model, scale=3.0)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 90, (length,), generator=generator).tolist() for length in (7, 3, 5)]
    english = [torch.randint(3, 90, (length,), generator=generator).tolist() for length in (4, 6, 2)]
    options = [[10], [11], [12, 13], [12, 14, 15]]
    scores = option_log_likelihoods(
        model, prompts, options, pad_id=0, batch_size=2, connection=connection, english_prompts=english
    )

    expected = torch.empty(len(prompts), len(options))
    with torch.no_grad():
        for i, (prompt, english_prompt) in enumerate(zip(prompts, english)):
            for k, option in enumerate(options):
                ids = torch.tensor([prompt + option])
                extra = {}
                if connection != "off":
                    extra["anchor_positions"] = torch.tensor([len(prompt) - 1])
                if connection == "bilingual":
                    extra["english_input_ids"] = torch.tensor([english_prompt])
                log_probs = torch.log_softmax(model(input_ids=ids, **extra).logits[0].float(), dim=-1)
                expected[i, k] = sum(log_probs[len(prompt) - 1 + j, token] for j, token in enumerate(option))
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-4)

    if connection != "off":
        plain = option_log_likelihoods(model, prompts, options, pad_id=0, connection="off")
        assert not torch.allclose(scores, plain, atol=1e-3), "the connection should change the scores"


def test_option_scoring_uses_position_ids_from_the_mask():
    """Left padding must not shift positions: a padded row scores as it does alone."""
    model = make_cc_model("llama", train=False)
    batch = left_pad([[5, 6, 7, 8], [9, 10]], pad_id=0)
    assert position_ids_from_attention_mask(batch["attention_mask"])[1].tolist() == [0, 0, 0, 1]
    together = option_log_likelihoods(model, [[5, 6, 7, 8], [9, 10]], [[11], [12]], pad_id=0, batch_size=2)
    alone = option_log_likelihoods(model, [[9, 10]], [[11], [12]], pad_id=0, batch_size=1)
    torch.testing.assert_close(together[1:], alone, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ evaluate


def test_evaluate_every_benchmark_on_a_layout_copy(tiny_model, tokenizer, data_root, tmp_path):
    results = evaluate(
        tiny_model, tokenizer, data_root=str(data_root), limit=2, offset=1, batch_size=2, show_progress=False
    )

    settings = results["settings"]
    assert settings["limit"] == 2 and settings["offset"] == 1 and settings["max_new_tokens"] == 40
    assert settings["chat_template"] is True and settings["connection"] is None
    assert set(results["benchmarks"]) == set(LAYOUT)
    for name, entry in results["benchmarks"].items():
        assert set(entry["languages"]) == set(LAYOUT[name])
        for result in entry["languages"].values():
            assert result["indices"] == [1, 2] and result["num_items"] == 2
            assert [item["index"] for item in result["items"]] == [1, 2]
            for key, value in result["scores"].items():  # scores are means of the item scores
                if key != "majority_rate":
                    assert value == pytest.approx(sum(item["scores"][key] for item in result["items"]) / 2)
        non_english = [language for language in entry["languages"] if language != "en"]
        primary = entry["primary_metric"]
        assert entry["average_non_english"][primary] == pytest.approx(
            sum(entry["languages"][language]["scores"][primary] for language in non_english) / len(non_english)
        )
        assert entry["average_all"][primary] == pytest.approx(
            sum(result["scores"][primary] for result in entry["languages"].values()) / len(entry["languages"])
        )

    xnli = results["benchmarks"]["XNLI"]["languages"]["zh"]
    assert xnli["scores"]["majority_rate"] == 1.0  # the gold labels of items 1 and 2 are "2" and "2"
    assert xnli["label_counts"]["gold"] == {"2": 2}
    assert {"accuracy", "accuracy_loglik", "unparsed", "majority_rate"} <= set(xnli["scores"])
    assert all(len(item["option_log_likelihoods"]) == 3 for item in xnli["items"])
    assert results["benchmarks"]["MMMLU"]["languages"]["ko"]["scores"]["majority_rate"] == 0.5  # "B", "C"
    assert set(results["benchmarks"]["XQuAD"]["average_all"]) == {"exact_match", "f1", "contains", "answer_nll"}
    assert "answer_nll" not in xnli["scores"]

    paths = write_report({"tiny": results}, tmp_path / "base" / "results.json")
    assert {path.name for path in paths.values()} == {"results.json", "results.md", "results.png"}
    assert paths["plot"].stat().st_size > 1000
    assert load_results([paths["json"]])["tiny"]["benchmarks"]["XNLI"]["languages"]["zh"]["indices"] == [1, 2]


def test_answer_nll_is_the_gold_answers_mean_token_loss_after_the_prompt(tiny_model, tokenizer, data_root, tmp_path):
    def japanese_mkqa(**options):
        options = dict(data_root=str(data_root), benchmarks=["MKQA"], languages=["ja"], show_progress=False, **options)
        return evaluate(tiny_model, tokenizer, **options)

    results = japanese_mkqa(limit=2)
    language = results["benchmarks"]["MKQA"]["languages"]["ja"]
    assert language["seconds"]["answer_scoring"] >= 0
    for record, item in zip(language["items"], load_parallel_items(str(data_root), "MKQA", "ja")):
        prompt = encode_prompt(tokenizer, item.prompt, chat_template=True)
        answer = tokenizer(item.first_answer, add_special_tokens=False)
        ids = torch.tensor([prompt + answer["input_ids"]])
        with torch.no_grad():
            logits = tiny_model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
        expected = torch.nn.functional.cross_entropy(logits, torch.tensor(answer["input_ids"])).item()
        assert record["scores"]["answer_nll"] == pytest.approx(expected, abs=1e-3)
        assert expected > 0

    table = markdown_report({"tiny": results})
    assert f"{language['scores']['answer_nll']:.2f}" in table  # in nats, not in %

    skipped = japanese_mkqa(limit=1, answer_log_likelihood=False)
    assert "answer_nll" not in skipped["benchmarks"]["MKQA"]["languages"]["ja"]["scores"]


def test_languages_and_offsets_that_a_benchmark_lacks_are_skipped(tiny_model, tokenizer, data_root):
    results = evaluate(
        tiny_model,
        tokenizer,
        EvaluationConfig(str(data_root), benchmarks=["xquad", "XLSum"], languages=["th", "fr"], show_progress=False),
        offset=3,
        max_new_tokens=4,
    )
    xquad, xlsum = results["benchmarks"]["XQuAD"], results["benchmarks"]["XLSum"]
    assert list(xquad["languages"]) == ["th"] and xquad["skipped_languages"] == {"fr": "not in this benchmark"}
    assert xquad["languages"]["th"]["indices"] == [3]
    assert xquad["average_non_english"] == xquad["average_all"]
    assert list(xlsum["languages"]) == ["fr"]
    with pytest.raises(ValueError, match="Unknown benchmark"):
        evaluate(tiny_model, tokenizer, data_root=str(data_root), benchmarks=["SQuAD"])


def test_cc_adapter_connections(tokenizer, data_root, tmp_path):
    model = _tiny_cc_model(tokenizer)
    config = EvaluationConfig(
        str(data_root), benchmarks=["XNLI"], languages=["zh"], limit=3, max_new_tokens=6, show_progress=False
    )
    by_connection = {
        connection: evaluate(model, tokenizer, config, connection=connection)
        for connection in ("monolingual", "bilingual", "off")
    }
    assert evaluate(model, tokenizer, config)["settings"]["connection"] == "monolingual"  # the default

    def items(results):
        return results["benchmarks"]["XNLI"]["languages"]["zh"]["items"]

    def log_likelihoods(results):
        return [item["option_log_likelihoods"] for item in items(results)]

    assert by_connection["off"]["settings"]["connection"] == "off"
    for connection in ("monolingual", "bilingual"):  # the connection reaches both generation and scoring
        assert log_likelihoods(by_connection[connection]) != log_likelihoods(by_connection["off"])
        outputs = [item["output"] for item in items(by_connection[connection])]
        assert outputs != [item["output"] for item in items(by_connection["off"])]

    # The same adapter saved and loaded by `load_system` (what --model/--adapter do) scores the same.
    _tiny_model(len(tokenizer)).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    model.save_pretrained(tmp_path / "adapter")
    loaded, loaded_tokenizer, settings = load_system(str(tmp_path / "base"), tmp_path / "adapter", device="cpu")
    reloaded = evaluate(loaded, loaded_tokenizer, config, settings=settings)
    assert reloaded["settings"]["adapter"] == str((tmp_path / "adapter").resolve())
    torch.testing.assert_close(
        torch.tensor(log_likelihoods(reloaded)),
        torch.tensor(log_likelihoods(by_connection["monolingual"])),
        atol=1e-3,
        rtol=0,
    )

    with pytest.raises(ValueError, match="never fitted"):
        evaluate(_tiny_cc_model(tokenizer, fitted=False), tokenizer, config)
    with pytest.raises(ValueError, match="needs a CC-Tuning adapter"):
        evaluate(_tiny_model(len(tokenizer)), tokenizer, config, connection="bilingual")


# ------------------------------------------------------------------------------------------------ command line


def test_compare_writes_systems_side_by_side(tiny_model, tokenizer, data_root, tmp_path, capsys):
    config = EvaluationConfig(
        str(data_root), benchmarks=["MKQA", "XNLI"], limit=2, max_new_tokens=4, show_progress=False
    )
    first = write_report({"base": evaluate(tiny_model, tokenizer, config)}, tmp_path / "a")
    second = write_report({"other": evaluate(_tiny_model(len(tokenizer), seed=1), tokenizer, config)}, tmp_path / "b")

    assert main(["--compare", str(first["json"]), str(second["json"]), "--output", str(tmp_path / "cmp.json")]) == 0
    markdown = (tmp_path / "cmp.md").read_text(encoding="utf-8")
    assert (
        "| language | items | majority | base acc | base acc (log-lik.) | other acc | other acc (log-lik.) |"
        in markdown
    )
    assert (
        "| language | items | base acc | base F1 | base gold NLL | other acc | other F1 | other gold NLL |" in markdown
    )
    assert (tmp_path / "cmp.png").is_file()
    assert list(load_results([tmp_path / "cmp.json"])) == ["base", "other"]
    assert "## MKQA" in capsys.readouterr().out


@pytest.mark.skipif(not os.path.isdir(REAL_DATA_ROOT), reason=f"no benchmark samples at {REAL_DATA_ROOT}")
def test_command_line_on_the_real_benchmarks(tokenizer, tmp_path):
    model_dir = tmp_path / "tiny-model"
    _tiny_model(len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    output = tmp_path / "out" / "results.json"
    command = [sys.executable, "-m", "peft_cc.evaluation", "--model", str(model_dir), "--data-root", REAL_DATA_ROOT]
    command += [
        "--benchmarks",
        "XNLI,MKQA",
        "--languages",
        "en,zh",
        "--limit",
        "2",
        "--output",
        str(output),
        "--quiet",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT), TOKENIZERS_PARALLELISM="false")
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert finished.returncode == 0, finished.stdout + finished.stderr

    results = load_results([output])["tiny-model"]
    assert results["settings"]["command"][1:3] == ["-m", "peft_cc.evaluation"]
    for benchmark in ("XNLI", "MKQA"):
        for language in ("en", "zh"):
            assert results["benchmarks"][benchmark]["languages"][language]["indices"] == [0, 1]
    assert output.with_suffix(".md").is_file() and output.with_suffix(".png").is_file()


def test_command_line_takes_the_base_model_from_the_adapter(tokenizer, data_root, tmp_path):
    """Without --model, the evaluator loads the base model that the adapter's config records."""
    model_dir = tmp_path / "tiny-model"
    _tiny_model(len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    base = LlamaForCausalLM.from_pretrained(model_dir)  # records model_dir as the adapter's base
    make_cc_model("llama", base=base, train=False).save_pretrained(tmp_path / "adapter")
    output = tmp_path / "out" / "results.json"
    arguments = ["--adapter", str(tmp_path / "adapter"), "--data-root", str(data_root), "--benchmarks", "MKQA"]
    arguments += ["--connection", "off", "--languages", "de", "--limit", "1"]
    assert main([*arguments, "--output", str(output), "--quiet"]) == 0
    settings = load_results([output])["adapter (off)"]["settings"]
    assert settings["model"] == str(model_dir)


def test_adapter_base_model(tmp_path):
    """The base model the adapter records; a folder without adapter config, or a config without base, fails."""
    config_file = tmp_path / "adapter_config.json"
    config_file.write_text(json.dumps({"base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}))
    assert adapter_base_model(tmp_path) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(ValueError, match="no adapter_config.json.*--model"):
        adapter_base_model(tmp_path / "missing")
    config_file.write_text(json.dumps({"base_model_name_or_path": None}))
    with pytest.raises(ValueError, match="records no base model"):
        adapter_base_model(tmp_path)
