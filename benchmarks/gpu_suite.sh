#!/usr/bin/env bash
# The GPU session's runs in one place, for the device tool (one call runs the stages named, each
# under its own time limit, everything written to $OUT). From the repo root on the GPU machine:
#   bash benchmarks/gpu_suite.sh tests engine          # first call: also saves the flashinfer and Triton caches
#   bash benchmarks/gpu_suite.sh multiplex predictor
#   bash benchmarks/gpu_suite.sh serving-code          # a serving stage fills most of one call
# Needs .whl/ filled by benchmarks/device_prep.sh (carry [".whl"]). Stages: tests tests-pages (the GPU tests with KV
# pages of PAGE tokens, 32 unless set, the CUDA-core decode kernel up to CUDA_CORES rows, decode graphs reading
# KV unsplit from UNSPLIT rows and epilogue_norm_rows EPI, the defaults unless set; -v, so a log cut off by its time limit shows how far it got) experiments (GPU tests marked experimental: open questions, e.g. partition-sized kernels) profile
# profile-decode (kernel tables of replayed decode graphs at 1k context, attention by page size) gemm-lib (decode
# GEMMs by BLAS library; GEMM_LIBS, GEMM_ROWS) skinny-gemm (tune the Triton decode GEMM against cuBLAS)
# decode-attention (flashinfer's graph decode kernel options) decode-gemm (the folded decode GEMMs against cuBLAS
# and the small kernels: a layer's projections, a config search, the decode grid with and without) decode-ab (the
# engine's decode grid under cuBLASLt, then cuBLAS) decode-pages (the decode grid with KV pages of 16 and 32 tokens;
# PAGES="16 64" for others) decode-pieces (decode at 1k without the piecewise prefill graphs, with them, with them
# and a frozen heap) decode-split (B=16 and 24 with flashinfer's KV split, then unsplit from 16) decode-cc (the
# decode grid with buckets up to CUDA_CORES rows on flashinfer's CUDA-core kernel, 0 unless set: tensor cores
# everywhere) decode-ws (decode at 1k with cuBLAS's workspace, then with none: no split-K reduce kernels; results of
# the second under $OUT/ws0; all three with KV pages of PAGE tokens, the default unless set) decode-kernels (decode
# attention at mixed lengths by kernel, then the decode grid at the defaults, with tensor cores and KV unsplit from 16,
# and with that and the decode graphs' GEMMs on cuBLASLt without workspace) decode-kernels-lt (the latter alone) decode-skew
# (decode attention at B=16 and 24, KV split or not, lengths spread by each of SPREADS) l2-prefetch (a decode GEMM
# after its first weights were prefetched into L2 during a small kernel) decode-prefetch (the decode grid with the
# decode graphs prefetching the first PF_KIB KiB of QKV, gate/up and down into L2, "0 8192 0 8192" unless set: alternated,
# as one ordered pair could not tell the prefetch from the drift; ~30 s a run with a warm JIT cache, 140 s at most)
# decode-epi (the decode grid with epilogue_norm_rows of each of EPI_ROWS, "0 256 0 256" unless set, alternated likewise)
# profile-epi (kernel tables of B=16 1k decode graphs with epilogue_norm_rows 0, then 256)
# tests-epi (the GPU tests of the norms in the projections' epilogues: against the reference, graph replay against
# eager under the host-sync check) engine multiplex
# multiplex-wide (the multiplex benchmark with 256 decoders at 512 context: the KV bytes of 64 at 2k, four times the
# tokens a step, so a decode SM may out-emit a prefill SM and a split gain; results named -b256-ctx512-p8192)
# multiplex-lt multiplex-sized multiplex-gemm (the multiplex benchmark under cuBLASLt with kernels sized for the device,
# then the partition, then the partition's GEMMs only, FA3 prefill kept)
# predictor (the shapes serving runs) predictor-all (every shape on every SM count) serving-code
# serving-conv serving-code-more (the paper-style duet-tbt and static on Azure code) serving-conv-static serving-conv-knee
# (Azure conversation past the baselines' knee) serving-conv-steady (60 s of conversation trace per point, up to
# 3000 requests: past the first burst, into steady state; STEADY_POLICIES, STEADY_RATES). EAGER=1: every serving
# stage serves without piecewise graphs (results named <gpu>, else <gpu>-piecewise) engine-eager (the engine benchmark with prefill passes launched eagerly, not as piecewise graphs)
# profile-eager (host launch and device time of eager prefill and mixed steps) prefix-cache (a shared
# 2k-token system prompt served offline with prefix caching off and on) serving-prefix (the same
# through duetserve serve and bench serve --random-prefix-len, 200 requests at 8 req/s, cache off and on) priority
# (an urgent fifth of 300 requests over a queue, fcfs then --scheduling-policy priority) stream (256 streams
# through duetserve serve on the real data plane, --stream-interval 1 then 4: output tok/s, control-plane CPU a token). GPU name for file names: GPU=h200 (default).
# planning (planning a step never waits for the GPU, and the plan-race test with the plan pool bypassed, which must
# fail) structured (64 streams through duetserve serve: no grammar, a regex each, half and half, a JSON
# schema each: output tok/s and TPOT; masks following the plan, then one step at a time) structured-serving (the
# Azure conversation trace at RATE req/s, 4 unless set, with 0, half and all requests under a regex: goodput, TPOT)
# startup (seconds from `serve --model ${MODEL:-qwen3-8b}` to its ready line)
# TEST_LIMIT: seconds the test stages may run (580 unless set; less leaves the call time to save the JIT cache).
# Every other stage runs the data plane's defaults, piecewise graphs included.
set -uo pipefail
cd "$(dirname "$0")/.."
. benchmarks/gpu_env.sh || exit 1
OUT=${OUT:-/tmp/out}; GPU=${GPU:-h200}; mkdir -p "$OUT"
# serving stages launch prefill and mixed passes as piecewise graphs (the default; results named
# <gpu>-piecewise) or, with EAGER=1, eagerly (results named <gpu>, like the sweeps from before the pieces)
if [ "${EAGER:-0}" != 0 ]; then LAUNCH=--no-piecewise-graphs; TAG=""; else LAUNCH=""; TAG=-piecewise; fi
DK="--decode-only --decode-batches 16,24,64 --decode-contexts 1024,4096 --out $OUT"  # decode-kernels' grid
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv,noheader | tee "$OUT/gpu.txt"
run() {  # run NAME LIMIT_S CMD...: one stage, its log under $OUT, a line with its exit status
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "stage $name: exit $? in $((SECONDS - t0)) s"; grep -v Warning "$OUT/$name.log" | tail -12
}
for stage in "$@"; do
  case $stage in
    tests) run tests ${TEST_LIMIT:-580} python3 -u -m pytest -m "gpu and not experimental" tests/dataplane -v -x -p no:cacheprovider
           save_fi_cache "$OUT" ;;
    tests-pages) DUETSERVE_TEST_BLOCK_SIZE=${PAGE:-32} DUETSERVE_TEST_CUDA_CORE_MAX_BATCH=${CUDA_CORES:-} \
                 DUETSERVE_TEST_UNSPLIT_KV_MIN_BATCH=${UNSPLIT:-} DUETSERVE_TEST_EPILOGUE_NORM_ROWS=${EPI:-} \
                 run tests-page${PAGE:-32}${CUDA_CORES:+-cc$CUDA_CORES}${UNSPLIT:+-unsplit$UNSPLIT}${EPI:+-epi$EPI} ${TEST_LIMIT:-580} python3 -u -m pytest \
                   -m "gpu and not experimental" tests/dataplane -v -p no:cacheprovider --durations 12
                 save_fi_cache "$OUT" ;;  # another KV page size; the cache keeps the CUDA-core decode kernels
    planning) run h2d-probe 60 python3 -u -c "import time, torch
x = torch.arange(4096, dtype=torch.int32)
for name, src in (('pageable', x), ('pinned', x.pin_memory())) * 2:
    torch.cuda.synchronize(); torch.cuda._sleep(int(3e8)); behind = torch.cuda.Event(); behind.record()
    t = time.perf_counter(); src.to('cuda', non_blocking=True); dt = time.perf_counter() - t
    print(f'{name} 16 KiB .to(cuda, non_blocking=True) with ~0.2 s of GPU work queued: {dt * 1e3:.2f} ms,',
          'returned first' if not behind.query() else 'waited for the GPU'); torch.cuda.synchronize()"
              run planning 300 python3 -u -m pytest -m gpu tests/dataplane/test_gpu_planning.py -v -x -p no:cacheprovider
              # the plan-race test again with the plan pool bypassed (each plan on the wrapper's own pinned
              # buffer): it must fail there, or it cannot tell the pool from no pool
              run planning-nopool 120 python3 -u -c "import sys, pytest, dataplane.attention.plan_staging as ps
ps.PlanStaging.plan = lambda self, wrapper, *a, **k: wrapper.plan(*a, **k)
sys.exit(pytest.main(['-m', 'gpu', '-v', '-p', 'no:cacheprovider',
  'tests/dataplane/test_gpu_planning.py::test_replanning_while_the_gpu_is_behind_keeps_each_plan']))"
              echo "(planning-nopool is expected to FAIL: a pass there means the test cannot tell the pool from none)" ;;
    structured) run structured 300 python3 -u benchmarks/structured_outputs.py --gpu cuda --model ${MODEL:-qwen3-8b} \
                  --concurrency 64 --output-len 256 --prompt-len 512 --out "$OUT/structured-outputs-$GPU.json"
                run structured-one-at-a-time 300 python3 -u benchmarks/structured_outputs.py --gpu cuda \
                  --no-defer-token-masks --model ${MODEL:-qwen3-8b} --concurrency 64 --output-len 256 \
                  --prompt-len 512 --out "$OUT/structured-outputs-$GPU-one-at-a-time.json" ;;
    structured-serving) run structured-serving 560 python3 -u benchmarks/structured_serving.py --gpu cuda \
                          --model ${MODEL:-qwen3-8b} --request-rate ${RATE:-4} --num-prompts 200 \
                          --out "$OUT/structured-serving-$GPU.json" ;;
    startup) : > "$OUT/startup.log"; t0=$SECONDS  # seconds from start to serve's ready line, then Ctrl-C
             timeout 600 python3 -u -m controlplane.cli serve --model ${MODEL:-qwen3-8b} >> "$OUT/startup.log" 2>&1 &
             pid=$!; ready=""
             while kill -0 $pid 2>/dev/null && [ $((SECONDS - t0)) -le 400 ]; do
               if grep -qs "serving duetserve" "$OUT/startup.log"; then ready=$((SECONDS - t0)); break; fi
               sleep 1
             done
             if [ -n "$ready" ]; then msg="ready line after $ready s"; else msg="no ready line (exited or past 400 s)"; fi
             echo "stage startup: $msg" | tee -a "$OUT/startup.log"
             kill -INT $pid 2>/dev/null; t1=$SECONDS
             while kill -0 $pid 2>/dev/null && [ $((SECONDS - t1)) -le 60 ]; do sleep 1; done
             kill -9 $pid 2>/dev/null; wait $pid; echo "serve exit $? ($((SECONDS - t1)) s after Ctrl-C)"
             grep -v Warning "$OUT/startup.log" | tail -15 ;;
    experiments) run experiments 560 python3 -u -m pytest -m experimental tests/dataplane -v -p no:cacheprovider \
                   --timeout 320  # the partition-sized test took 201 s with its FA2 kernels built
                 save_fi_cache "$OUT" ;;  # FA2 prefill modules for partitions
    profile) run profile 300 python3 benchmarks/profile_step.py --out "$OUT" ;;
    profile-eager) run profile-eager 300 python3 benchmarks/profile_step.py --no-piecewise-graphs --out "$OUT" ;;
    profile-decode) for b in 16 64; do run profile-decode-$b 200 python3 benchmarks/profile_decode.py --graphs \
                      --batch $b --context 1024 --page-sizes 16,32,64; done ;;
    gemm-lib) run gemm-lib 300 python3 benchmarks/gemm_lib.py --libraries ${GEMM_LIBS:-cublas,cublaslt} \
                --batches ${GEMM_ROWS:-1,16,64,256} --out "$OUT" ;;
    skinny-gemm) run skinny-gemm 420 python3 benchmarks/skinny_gemm.py --out "$OUT" --stages ${GEMM_STAGES:-4} \
                   --warps ${GEMM_WARPS:-4} --rows ${GEMM_ROWS:-1,16,32,64,128} ;;
    decode-attention) run decode-attention 300 python3 benchmarks/decode_attention.py --out "$OUT" ;;
    decode-ab) for lib in cublaslt cublas; do  # the decode grid under each BLAS library, same machine
                 run decode-$lib 300 python3 benchmarks/engine.py --decode-only --blas-library $lib --out "$OUT"
               done ;;
    decode-gemm) run decode-gemm 300 python3 benchmarks/decode_gemm.py --tune-rows 16,64 --out "$OUT"
                 for rows in 64 0; do  # the decode grid with the folded decode GEMMs, then without
                   run decode-fold$rows 150 python3 benchmarks/engine.py --decode-only --decode-gemm-rows $rows --out "$OUT"
                 done ;;
    decode-pages) for bs in ${PAGES:-16 32}; do  # the decode grid by KV page size, same machine (2 fit a call)
                    run decode-page$bs 280 python3 benchmarks/engine.py --decode-only --block-size $bs --out "$OUT"
                  done ;;
    decode-pieces) DP="--decode-only --decode-batches 1,16,64 --decode-contexts 1024 ${PAGE:+--block-size $PAGE} --out $OUT"
                   run decode-nopieces 150 python3 benchmarks/engine.py $DP  # the decode points three ways, same machine
                   run decode-pieces 200 python3 benchmarks/engine.py $DP --piecewise-graphs
                   run decode-pieces-gc 200 python3 benchmarks/engine.py $DP --piecewise-graphs --gc-freeze ;;
    decode-ws) DW="--decode-only --decode-batches 1,16,64 --decode-contexts 1024 ${PAGE:+--block-size $PAGE}"
               run decode-ws-default 200 python3 benchmarks/engine.py $DW --out "$OUT"  # cuBLAS's workspace, then none
               CUBLAS_WORKSPACE_CONFIG=:0:0 run decode-ws0 200 python3 benchmarks/engine.py $DW --out "$OUT/ws0" ;;
    decode-split) DS="--decode-only --decode-batches 16,24 --decode-contexts 1024,4096 ${PAGE:+--block-size $PAGE}"
                  run decode-split-default 200 python3 benchmarks/engine.py $DS --out "$OUT"  # KV split from 32 down
                  run decode-unsplit16 200 python3 benchmarks/engine.py $DS --unsplit-kv-min-batch 16 --out "$OUT" ;;
    decode-cc) run decode-cc 200 python3 benchmarks/engine.py --decode-only --decode-batches 1,16,64 \
                 --decode-contexts 1024,4096 ${PAGE:+--block-size $PAGE} --cuda-core-max-batch ${CUDA_CORES:-0} --out "$OUT" ;;
    decode-kernels) TC="--cuda-core-max-batch 0 --unsplit-kv-min-batch 16"  # tensor cores, KV unsplit from 16
                    run decode-attention-spread 240 python3 benchmarks/decode_attention.py --batches 16,24,64 \
                      --contexts 1024,4096 --length-spread 0.75 --variants cuda-cores,tc,tc-nosplit --out "$OUT"
                    run decode-k-default 300 python3 benchmarks/engine.py $DK  # limits leave room for a cold JIT cache
                    run decode-k-tc 150 python3 benchmarks/engine.py $DK $TC
                    TORCH_CUBLASLT_UNIFIED_WORKSPACE=0 CUBLASLT_WORKSPACE_SIZE=1 run decode-k-lt-tc 150 python3 benchmarks/engine.py $DK $TC \
                      --decode-blas-library cublaslt ;;  # decode GEMMs on cuBLASLt without workspace (no split-K): torch
                      # 2.11 gives cuBLASLt cuBLAS's workspace unless TORCH_CUBLASLT_UNIFIED_WORKSPACE=0
    l2-prefetch) run l2-prefetch 200 python3 benchmarks/l2_prefetch.py --out "$OUT" ;;
    decode-prefetch) i=0; for kib in ${PF_KIB:-0 8192 0 8192}; do  # the decode grid by L2 prefetch size (KiB)
                       i=$((i + 1)); mkdir -p "$OUT/pf$i"  # run i's file under $OUT/pf<i> (the last --out wins)
                       run decode-pf$kib-$i 140 python3 benchmarks/engine.py $DK --out "$OUT/pf$i" \
                         --decode-l2-prefetch-kib $kib ${CUDA_CORES:+--cuda-core-max-batch $CUDA_CORES}
                     done ;;
    decode-epi) i=0; for rows in ${EPI_ROWS:-0 256 0 256}; do  # the decode grid by epilogue_norm_rows, alternated (the first run
                  # of a fresh machine took 140 s and drifted: EPI_ROWS="0 0 256 0 256" spends one on the warm-up)
                  i=$((i + 1)); mkdir -p "$OUT/epi$i"  # run i's file under $OUT/epi<i>
                  run decode-epi$rows-$i 140 python3 benchmarks/engine.py $DK --out "$OUT/epi$i" \
                    --epilogue-norm-rows $rows ${CUDA_CORES:+--cuda-core-max-batch $CUDA_CORES}
                done ;;
    profile-epi) for rows in 0 256; do  # kernel tables of replayed decode graphs at B=16 1k, norms as kernels, then in epilogues
                   run profile-epi$rows 150 python3 benchmarks/profile_decode.py --graphs --batch 16 --context 1024 \
                     --page-sizes "" --epilogue-norm-rows $rows
                 done ;;
    tests-epi) run tests-epi ${TEST_LIMIT:-300} python3 -u -m pytest -m gpu tests/dataplane/test_gpu.py tests/dataplane/test_gpu_kernel_options.py -v -p no:cacheprovider \
                 -k "epilogue or fused_path_matches" ;;  # the norms-in-epilogues tests
    decode-skew) for s in ${SPREADS:-0.05 0.1 0.2 0.3}; do  # where an unsplit twin stops paying (BALANCED_MAX_SKEW)
                   run decode-attention-spread$s 120 python3 benchmarks/decode_attention.py --batches 16,24 \
                     --contexts 1024,4096 --length-spread $s --variants tc,tc-nosplit --out "$OUT"
                 done ;;
    decode-kernels-lt) TORCH_CUBLASLT_UNIFIED_WORKSPACE=0 CUBLASLT_WORKSPACE_SIZE=1 run decode-k-lt 150 python3 benchmarks/engine.py $DK \
                         --decode-blas-library cublaslt ;;
    engine) run engine 400 python3 benchmarks/engine.py --peer-requests 64 --peer-output-len 128 ${PAGE:+--block-size $PAGE} \
              ${CUDA_CORES:+--cuda-core-max-batch $CUDA_CORES} ${EPI:+--epilogue-norm-rows $EPI} ${WS:+--cublas-workspace-config $WS} --out "$OUT" ;;  # PAGE,
              # CUDA_CORES, EPI, WS: KV page size, CUDA-core rows, epilogue_norm_rows, cuBLAS workspace (":0:0": none;
              # default: the data plane's)
    logprob-error) run logprob-error 300 python3 benchmarks/prompt_logprob_error.py --out "$OUT" ;;  # each path's prompt logprobs vs fp32 CPU
    prefix-cache) run prefix-cache 300 python3 benchmarks/prefix_cache.py --out "$OUT" ;;
    stream) run stream 560 python3 benchmarks/stream_throughput.py --gpu cuda --concurrency 256 \
              --stream-intervals 1,4 --out "$OUT/stream-throughput-$GPU.json" ;;
    priority) run priority 400 python3 benchmarks/priority.py $LAUNCH --gpu "$GPU$TAG" --out "$OUT" ;;
    serving-prefix) run serving-prefix 560 python3 benchmarks/serving_prefix.py $LAUNCH --gpu "$GPU$TAG" \
                      --out "$OUT" ;;
    engine-eager) run engine-eager 400 python3 benchmarks/engine.py --no-piecewise-graphs --out "$OUT" ;;
    multiplex) run multiplex 400 python3 benchmarks/multiplex.py --out "$OUT" ;;
    multiplex-wide) run multiplex-wide 500 python3 benchmarks/multiplex.py --batch 256 --context 512 --splits 8,16,24,32 \
                      --out "$OUT" ;;  # a wide, short decode batch: 4x the tokens a step of 64 at 2k
    multiplex-lt) run multiplex-lt 400 python3 benchmarks/multiplex.py --blas-library cublaslt --out "$OUT" ;;
    multiplex-sized) run multiplex-sized 400 python3 benchmarks/multiplex.py --blas-library cublaslt \
                       --partition-kernels partition --out "$OUT"
                     save_fi_cache "$OUT" ;;
    multiplex-gemm) run multiplex-gemm 400 python3 benchmarks/multiplex.py --blas-library cublaslt \
                      --partition-kernels gemm --out "$OUT" ;;
    predictor) run predictor 400 python3 benchmarks/predictor.py --partitions --decode-sizes 32,64 \
                 --sm-counts 32,64,68,100,132 --grid serving --reps 2 --out "$OUT" ;;
    predictor-all) run predictor-all 400 python3 benchmarks/predictor.py --partitions --decode-sizes 32,64 \
                     --sm-counts 32,68,100,132 --reps 2 --out "$OUT" ;;
    serving-code) run serving-code 560 python3 benchmarks/serving.py $LAUNCH --gpu "$GPU$TAG" --traces code \
                    --policies duet,aggregated,prefill-first --rates ${CODE_RATES:-2,4,8} --seconds 18 --min-requests 40 --trace-dir .whl/traces --out "$OUT" ;;
    serving-conv) run serving-conv 560 python3 benchmarks/serving.py $LAUNCH --gpu "$GPU$TAG" --traces conv \
                    --policies duet,aggregated,prefill-first --rates ${CONV_RATES:-20,28,36} --seconds 15 --trace-dir .whl/traces --out "$OUT" ;;
    serving-code-more) run serving-code-more 560 python3 benchmarks/serving.py $LAUNCH --gpu "$GPU$TAG" --traces code \
                    --policies duet-tbt,static --rates ${CODE_RATES:-2,4,8} --seconds 18 --min-requests 40 --trace-dir .whl/traces --out "$OUT" ;;
    serving-conv-static) run serving-conv-static 300 python3 benchmarks/serving.py $LAUNCH --gpu "$GPU$TAG" --traces conv \
                    --policies static --rates ${CONV_RATES:-20,28,36} --seconds 15 --trace-dir .whl/traces --out "$OUT" ;;
    serving-conv-knee) run serving-conv-knee 560 python3 benchmarks/serving.py $LAUNCH --gpu "$GPU$TAG" --traces conv \
                    --policies duet,aggregated,prefill-first --rates ${KNEE_RATES:-40,48} --seconds 15 --trace-dir .whl/traces --out "$OUT" ;;
    serving-conv-steady) run serving-conv-steady 560 python3 benchmarks/serving.py --traces conv \
                    --policies ${STEADY_POLICIES:-duet,aggregated} --rates ${STEADY_RATES:-20,22} --seconds 60 \
                    --max-requests 3000 --trace-dir .whl/traces --out "$OUT" \
                    $LAUNCH --gpu "$GPU-steady$TAG" ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
ls -la "$OUT"
