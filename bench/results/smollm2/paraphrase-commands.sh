# Issue 16: SmolLM2-135M-Instruct + LoRA as a causal LM on MRPC paraphrases, the U-shaped split through
# a real daemon against --local at the same budget (docs/accuracy.md). Run in this order, one at a time,
# from the repository root on the 2-core CPU (2026-11-26) beside other benchmarks at nice 12.
export OMP_NUM_THREADS=1
python -m bench.common --mrpc-paraphrases /tmp/smolmrpc   # {"train": 2473, "dev": 200}
# (bench.common.mrpc_paraphrases is retired: git show bdaffb8:bench/common.py)
COMMON="--problem causal-lm --train-file /tmp/smolmrpc/train.jsonl --dev-file /tmp/smolmrpc/dev.jsonl \
  --model smollm2-135m-instruct --peft lora --max-steps 80 --batch-size 8 --max-seq-len 96 --lr 5e-4 --seed 42 --no-progress"

# 1. the U (first cut at layer 0, one tail layer, rank 8, fp32): paraphrase-u-lora-r8-m80-s42.json
nice -n 10 python -m sft_cloud.cli serve --insecure --host 127.0.0.1 --port 51127 --checkpoint-dir /tmp/smolu/cloud &
/usr/bin/time -v nice -n 10 python -m sft_edge.cli train $COMMON --label-private --cloud 127.0.0.1:51127 --insecure \
  --output-dir /tmp/smolu/run --report /tmp/smolu/u-report.json
# the dev prompt's trailing newline kept (command substitution would strip it)
PROMPT="$(python -c "import json;print(json.loads(open('/tmp/smolmrpc/dev.jsonl').readline())['prompt'], end='')"; echo x)"
PROMPT="${PROMPT%x}"
python -m sft_edge.cli export --run /tmp/smolu/run --to /tmp/smolu/export --cloud 127.0.0.1:51127 --insecure
kill %1   # the daemon: the export generates without it
python -m sft_edge.cli generate --run /tmp/smolu/export --prompt "$PROMPT" --max-new-tokens 32 --json

# 2. --local at the same budget: paraphrase-local-lora-m80-s42.json (its step 0 is the base model)
/usr/bin/time -v nice -n 10 python -m sft_edge.cli train $COMMON --local --output-dir /tmp/smolu/local \
  --report /tmp/smolu/local-report.json
python -m sft_edge.cli generate --run /tmp/smolu/local --prompt "$PROMPT" --max-new-tokens 32 --json

# 3. the U with the SVD factors at 10x the learning rate: paraphrase-u-lora-r8-flr5e-3-m80-s42.json
nice -n 10 python -m sft_cloud.cli serve --insecure --host 127.0.0.1 --port 45527 --checkpoint-dir /tmp/smolu/cloud2 &
/usr/bin/time -v nice -n 10 python -m sft_edge.cli train $COMMON --label-private --factor-lr 5e-3 \
  --cloud 127.0.0.1:45527 --insecure --output-dir /tmp/smolu/run2 --report /tmp/smolu/u2-report.json
python -m sft_edge.cli generate --run /tmp/smolu/run2 --prompt "$PROMPT" --max-new-tokens 32 --json \
  --cloud 127.0.0.1:45527 --insecure

# the base model's greedy completion (no run folder holds it): build_causal_lm + generate.decode
python - <<'PY'
import json, torch
from transformers import AutoTokenizer
from sft_common.models.base_model import load_base_model
from sft_common.topology.ushape_lm import build_causal_lm
from sft_edge.finished.generate import decode, prompt_ids
prompt = json.loads(open("/tmp/smolmrpc/dev.jsonl").readline())["prompt"]
base = load_base_model("smollm2-135m-instruct")
model, tok = build_causal_lm(base, 42).eval(), AutoTokenizer.from_pretrained(base.tokenizer_dir)
with torch.no_grad():
    new = decode(lambda b: model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits,
                 prompt_ids(tok, prompt, chat=False), 32, 96, eos=tok.eos_token_id)
print(tok.decode(new, skip_special_tokens=True))
PY

# 4. The U with both cuts at the FFN input (--factorise ffn-input: the residual rides through the
# bottleneck, nothing is dropped) at R=576 (SmolLM2's hidden: lossless at step 0, SL's bytes) and
# R=64, the two IN PARALLEL (two daemons, two edges) on the 2-core CPU beside other benchmarks, at
# nice 5, 2026-11-26: paraphrase-u-ffn-input-lora-r576-m80-s42.json, paraphrase-u-ffn-input-lora-r64-m80-s42.json
# (the reports; /tmp/smolin/r$R/run/scalars.csv holds the per-step training loss).
ffn_input_u() {  # usage: ffn_input_u RANK PORT
  R=$1; PORT=$2; D=/tmp/smolin/r$R
  nice -n 5 python -m sft_cloud.cli serve --insecure --host 127.0.0.1 --port $PORT --checkpoint-dir $D/cloud &
  DPID=$!
  sleep 20
  /usr/bin/time -v nice -n 5 python -m sft_edge.cli train $COMMON --label-private --factorise ffn-input --rank $R \
    --cloud 127.0.0.1:$PORT --insecure --output-dir $D/run --report $D/report.json
  kill $DPID
}
ffn_input_u 576 36741 > /tmp/smolin/576.out 2>&1 &
ffn_input_u 64 49859 > /tmp/smolin/64.out 2>&1 &
wait

# Issue 34 (2026-12-07): the U with full-width cuts through the rotated-group codec, at the budget above
# (the paraphrase set: python -m bench.decoder_codecs makes it in --data DIR if missing).
# 4. 4 bits at both cuts: paraphrase-u-sl-int4-hadamard-zstd-lora-m80-s42.json
nice -n 5 python -m sft_cloud.cli serve --insecure --host 127.0.0.1 --port 51227 --checkpoint-dir /tmp/front/cloud &
/usr/bin/time -v nice -n 5 python -m sft_edge.cli train $COMMON --label-private --mode sl --wire-dtype int4-hadamard \
  --compression zstd --cloud 127.0.0.1:51227 --insecure --output-dir /tmp/front/run --report /tmp/front/u-h4-report.json
python -m sft_edge.cli generate --run /tmp/front/run --prompt "$PROMPT" --max-new-tokens 32 --json --cloud 127.0.0.1:51227 --insecure
python -m sft_edge.cli export --run /tmp/front/run --to /tmp/front/export --cloud 127.0.0.1:51227 --insecure
python -m sft_edge.cli generate --run /tmp/front/export --prompt "$PROMPT" --max-new-tokens 32 --json
# 5. the defaults (--mode sl --wire-dtype int4-6-hadamard: 4 bits up, 6 down the second cut):
#    paraphrase-u-default-zstd-lora-m80-s42.json, the same commands without --mode and --wire-dtype

# 7. Forward-only (issue 32, 2026-12-07): the U with its head and middle frozen, LoRA on the tail's
# layers only, each row's first cut sent once (int4-6-hadamard, zstd), the middle's answers cached;
# one daemon, the runs one after the other, at nice 10 beside other benchmarks (load 6-9 on 2 cores):
# paraphrase-forward-only-tail1-lora-zstd-m80-s42.json, paraphrase-forward-only-tail4-lora-zstd-m80-s42.json
nice -n 10 python -m sft_cloud.cli serve --insecure --host 127.0.0.1 --port 51341 &
for T in 1 4; do
  /usr/bin/time -v nice -n 10 python -m sft_edge.cli train $COMMON --forward-only --tail-layers $T --compression zstd \
    --cloud 127.0.0.1:51341 --insecure --output-dir /tmp/fo/t$T --report /tmp/fo/t$T-report.json
done

# 8. Forward-only with LoRA on every linear of the tail (issue 32, 2026-12-07, session 18): 8 and 4 tail layers,
# the two runs IN PARALLEL on one daemon, at nice 5 beside other benchmarks and test runs (load 6-11 on the
# 2-core CPU): paraphrase-forward-only-tail8-lora-all-zstd-m80-s42.json, paraphrase-forward-only-tail4-lora-all-zstd-m80-s42.json
ALL="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
nice -n 5 python -m sft_cloud.cli serve --insecure --host 127.0.0.1 --port 51441 &
for T in 8 4; do
  /usr/bin/time -v nice -n 5 python -m sft_edge.cli train $COMMON --forward-only --tail-layers $T --lora-targets $ALL \
    --compression zstd --cloud 127.0.0.1:51441 --insecure --output-dir /tmp/fo2/t$T --report /tmp/fo2/t$T-report.json &
done
wait

# 9. The same 8-tail-layer run at --lr 2e-3, from the 8-layer run's activation cache (copied into the new
# output folder: every training and dev row is cached, so no cloud session is opened and 0 bytes cross;
# the daemon above only has to be named): paraphrase-forward-only-tail8-lora-all-lr2e-3-cached-m80-s42.json.
# (A second run at --lr 1e-3 beside it was stopped at step 49 to free the CPU.)
mkdir -p /tmp/fo3/lr2e-3 && cp -r /tmp/fo2/t8/activation_cache /tmp/fo3/lr2e-3/
/usr/bin/time -v nice -n 5 python -m sft_edge.cli train ${COMMON/--lr 5e-4/--lr 2e-3} --forward-only --tail-layers 8 \
  --lora-targets $ALL --compression zstd --cloud 127.0.0.1:51441 --insecure --output-dir /tmp/fo3/lr2e-3 \
  --report /tmp/fo3/lr2e-3-report.json

# 10. --local at --lr 2e-3 (session 19, 2026-12-07; alone on one core beside run 11, load 2-3):
#     paraphrase-local-lora-lr2e-3-m80-s42.json (27 min, peak RSS 2.79 GB)
/usr/bin/time -v python -m sft_edge.cli train ${COMMON/--lr 5e-4/--lr 2e-3} --local --output-dir /tmp/s19/local2e-3 \
  --report /tmp/s19/local2e-3-report.json

# 11. Forward-only, 8 LoRA tail layers (every linear), --lr 2e-3, 4 bits down as well as up (--wire-dtype
#     int4-hadamard: the middle's answer at 306 B a token raw instead of int4-6-hadamard's 450), its own daemon,
#     beside run 10: paraphrase-forward-only-tail8-lora-all-int4-hadamard-lr2e-3-m80-s42.json (23 min, 1.93 GB)
python -m sft_cloud.cli serve --insecure --host 127.0.0.1 --port 51541 &
/usr/bin/time -v python -m sft_edge.cli train ${COMMON/--lr 5e-4/--lr 2e-3} --forward-only --tail-layers 8 --lora-targets $ALL \
  --wire-dtype int4-hadamard --cloud 127.0.0.1:51541 --insecure --output-dir /tmp/s19/fo-h4 --report /tmp/s19/fo-h4-report.json

# 12. The U with its gradients in 4-bit rotated groups too (--wire-dtype int4-6-hadamard-grad4, session 19;
#     its own daemon, beside runs 10-11, load 2-3): paraphrase-u-grad4-zstd-lora-m80-s42.json (31 min, 1.82 GB),
#     then its greedy completion of the first dev prompt through the daemon (paraphrase-generate.json)
python -m sft_cloud.cli serve --insecure --host 127.0.0.1 --port 51641 --checkpoint-dir /tmp/s19/g4cloud &
/usr/bin/time -v python -m sft_edge.cli train $COMMON --label-private --wire-dtype int4-6-hadamard-grad4 \
  --cloud 127.0.0.1:51641 --insecure --output-dir /tmp/s19/u-g4 --report /tmp/s19/u-g4-report.json
python -m sft_edge.cli generate --run /tmp/s19/u-g4 --prompt "$PROMPT" --max-new-tokens 32 --json --cloud 127.0.0.1:51641 --insecure

# 13. Forward-only with 16 LoRA tail layers (every linear), --lr 2e-3, at forward-only's default wire (int4-hadamard)
#     (session 19, its own daemon, beside runs 12 and 14 and a test suite, load 3-4):
#     paraphrase-forward-only-tail16-lora-all-int4-hadamard-lr2e-3-m80-s42.json (33 min, peak RSS 2.55 GB)
python -m sft_cloud.cli serve --insecure --host 127.0.0.1 --port 51741 &
/usr/bin/time -v python -m sft_edge.cli train ${COMMON/--lr 5e-4/--lr 2e-3} --forward-only --tail-layers 16 --lora-targets $ALL \
  --cloud 127.0.0.1:51741 --insecure --output-dir /tmp/s19/fo-t16 --report /tmp/s19/fo-t16-report.json

# 14. --local at --lr 4e-3 (session 19, beside run 13 and a test suite): paraphrase-local-lora-lr4e-3-m80-s42.json (33 min)
/usr/bin/time -v python -m sft_edge.cli train ${COMMON/--lr 5e-4/--lr 4e-3} --local --output-dir /tmp/s19/local4e-3 \
  --report /tmp/s19/local4e-3-report.json

# 15. The 16-tail-layer run at --lr 4e-3, from run 13's activation cache (copied: every row cached, 0 bytes;
#     a daemon at --cloud, though since abce968 none has to answer): paraphrase-forward-only-tail16-lora-all-lr4e-3-cached-m80-s42.json
mkdir -p /tmp/s19/fo-t16-4e-3 && cp -r /tmp/s19/fo-t16/activation_cache /tmp/s19/fo-t16-4e-3/
/usr/bin/time -v python -m sft_edge.cli train ${COMMON/--lr 5e-4/--lr 4e-3} --forward-only --tail-layers 16 --lora-targets $ALL \
  --cloud 127.0.0.1:51741 --insecure --output-dir /tmp/s19/fo-t16-4e-3 --report /tmp/s19/fo-t16-4e-3-report.json

# 16. The U of run 12 with the gradient's defence at the median example's gradient norm (session 20, its own
#     daemon, beside run 17 and benchmarks, load 3): paraphrase-u-grad4-dpgrad0.1-lora-m80-s42.json (36 min, 1.78 GB)
python -m sft_cloud.cli serve --insecure --host 127.0.0.1 --port 51941 --checkpoint-dir /tmp/s20/ugn/cloud &
/usr/bin/time -v python -m sft_edge.cli train $COMMON --label-private --wire-dtype int4-6-hadamard-grad4 \
  --dp-grad-noise 0.1 --dp-grad-clip 0.00157 \
  --cloud 127.0.0.1:51941 --insecure --output-dir /tmp/s20/ugn/run --report /tmp/s20/ugn/report.json

# 17. Forward-only with 12 LoRA tail layers (every linear) at --lr 4e-3, forward-only's default wire (session 20,
#     its own daemon, beside run 16): paraphrase-forward-only-tail12-lora-all-int4-hadamard-lr4e-3-m80-s42.json
#     (30 min, peak RSS 2.26 GB)
python -m sft_cloud.cli serve --insecure --host 127.0.0.1 --port 52041 &
/usr/bin/time -v python -m sft_edge.cli train ${COMMON/--lr 5e-4/--lr 4e-3} --forward-only --tail-layers 12 --lora-targets $ALL \
  --cloud 127.0.0.1:52041 --insecure --output-dir /tmp/s20/fo12/run --report /tmp/s20/fo12/report.json

# 18. The same at --dp-grad-noise 0.05, the least noise measured that brings the text attack under the
#     baseline + 10 points (session 20, its own daemon, beside a test suite, load 3):
#     paraphrase-u-grad4-dpgrad0.05-lora-m80-s42.json (26 min)
python -m sft_cloud.cli serve --insecure --host 127.0.0.1 --port 52141 --checkpoint-dir /tmp/s20/ugn05/cloud &
/usr/bin/time -v python -m sft_edge.cli train $COMMON --label-private --wire-dtype int4-6-hadamard-grad4 \
  --dp-grad-noise 0.05 --dp-grad-clip 0.00157 \
  --cloud 127.0.0.1:52141 --insecure --output-dir /tmp/s20/ugn05/run --report /tmp/s20/ugn05/report.json

# 19. Forward-only with 16 LoRA tail layers (every linear) at --lr 4e-3 as run 15, 3 bits both ways
#     (--wire-dtype int3-hadamard; session 21, its own daemon, for 17 of its 22 min beside a benchmark, load 2-3):
#     paraphrase-forward-only-tail16-lora-all-int3-hadamard-lr4e-3-m80-s42.json (22 min, peak RSS 2.49 GB)
python -m sft_cloud.cli serve --insecure --host 127.0.0.1 --port 52141 &
/usr/bin/time -v python -m sft_edge.cli train ${COMMON/--lr 5e-4/--lr 4e-3} --forward-only --tail-layers 16 --lora-targets $ALL \
  --wire-dtype int3-hadamard --compression zstd \
  --cloud 127.0.0.1:52141 --insecure --output-dir /tmp/s21/fo3/run --report /tmp/s21/fo3/report.json

# 20. A second seed: runs 15 and 19 at --seed 43 with the default --compression zstd-stream (packed
#     streams, session 21), side by side, each with its own daemon (load 4, 23 min each, peak RSS 2.55 / 2.57 GB):
#     paraphrase-forward-only-tail16-lora-all-int4-hadamard-stream-lr4e-3-m80-s43.json,
#     paraphrase-forward-only-tail16-lora-all-int3-hadamard-stream-lr4e-3-m80-s43.json
for WIRE_PORT in int4-hadamard:52241 int3-hadamard:52341; do
  WIRE=${WIRE_PORT%:*}; PORT=${WIRE_PORT#*:}
  python -m sft_cloud.cli serve --insecure --host 127.0.0.1 --port $PORT &
  /usr/bin/time -v python -m sft_edge.cli train ${COMMON/--lr 5e-4 --seed 42/--lr 4e-3 --seed 43} --forward-only \
    --tail-layers 16 --lora-targets $ALL --wire-dtype $WIRE --cloud 127.0.0.1:$PORT --insecure \
    --output-dir /tmp/s21/fo-$WIRE-s43/run --report /tmp/s21/fo-$WIRE-s43/report.json &
done; wait

# 21. --local at --lr 4e-3, --seed 43 (session 21, alone, OMP_NUM_THREADS=2; 13 min, peak RSS 2.74 GB):
#     paraphrase-local-lora-lr4e-3-m80-s43.json
/usr/bin/time -v python -m sft_edge.cli train ${COMMON/--lr 5e-4 --seed 42/--lr 4e-3 --seed 43} --local \
  --output-dir /tmp/s21/local43/run --report /tmp/s21/local43/report.json
