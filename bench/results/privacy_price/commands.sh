# Issue 30, item 2: the defences on MiniLM + SST-2 through the U (--label-private, the encoder's
# default: SFT R=8, first cut at layer 0, one tail layer), what was run (2026-12-07, 2-core CPU at
# load 6-10 beside other work; docs/privacy.md, "Defences"). From the repository root.
OUT=bench/results/privacy_price
GLUE=../shared/data/glue
export OMP_NUM_THREADS=1
nice -n 5 python -m sft_cloud.cli serve --insecure --host 127.0.0.1 --port 51331 &
TRAIN="--task sst2 --data-dir $GLUE --label-private --max-steps 60 --batch-size 32 --lr 5e-5 --max-seq-len 64
  --max-eval-examples 300 --seed 42 --cloud 127.0.0.1:51331 --insecure --no-progress"
# short runs through the daemon (60 steps: neither learnt SST-2 at this budget, both 51.7 %)
nice -n 5 python -m sft_edge.cli train $TRAIN --report $OUT/train-none.json
nice -n 5 python -m sft_edge.cli train $TRAIN --dp-grad-noise 2 --dp-grad-clip 0.003 --report $OUT/train-grad2.json
kill %1
# the label attack on the U's gradient up, SST-2's two labels, steps 0-7 (no daemon: in process)
LABELS="labels --task sst2 --steps 8 --window 8 --no-two-part --out-dir $OUT"
nice -n 5 python -m bench.gradient_attacks $LABELS --name labels-none
nice -n 5 python -m bench.gradient_attacks $LABELS --dp-grad-noise 2 --dp-grad-clip 0.003 --name labels-grad2
nice -n 5 python -m bench.gradient_attacks $LABELS --dp-grad-noise 0.5 --dp-grad-clip 0.003 --name labels-grad0.5
# the inversion attack on the first cut (layer 0, R=8) with the activations' defence
nice -n 5 python -m bench.inversion --layers 0 --ranks 8 --dp-noise 0.5 --dp-clip 20 --out-dir $OUT --name tokens-act0.5
