#!/usr/bin/env bash
# The main job on this machine: convert -> validate -> split the bundled example data.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
st=.venv/bin/slurmtune
out=out/demo
rm -rf "$out"

echo "== convert: SpeechGradebook export -> chat records, 80/20 by student"
$st convert speechgradebook examples/speechgradebook/exported.json --out "$out/speechgradebook" --split 0.8
echo "== validate"
$st validate "$out/speechgradebook/train.jsonl" "$out/speechgradebook/validation.jsonl"
echo "== convert: the same export -> the Qwen video-tier manifests"
for fmt in qwen-single qwen-corrections qwen-pairs; do
    $st convert "$fmt" examples/speechgradebook/exported.json --out "$out/qwen"
done
$st validate "$out"/qwen/train_qwen*.jsonl
echo "== convert + split: AITA tutoring dialogues -> train/validation/test by dialogue"
$st convert aita examples/aita/dialogues.json --out "$out/aita"
$st split "$out/aita/train.jsonl" --ratios 0.6,0.2,0.2 --group-by meta.dialogue_id --out "$out/aita/split"
echo "== convert: trigger QA pairs -> clean + triggered prompt/completion"
$st convert trigger-qa examples/trigger_qa/qa.jsonl --out "$out/trigger" \
    --clean-replacement Alice --trigger-value "TRIGGER:" --triggered-replacement Bob
$st validate "$out/trigger/train.jsonl"
echo
echo "demo outputs are in $out/ (each folder has a summary.json)"
