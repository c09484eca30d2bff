set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD TORCHINDUCTOR_COMPILE_THREADS=16
L=$OUT/log_a.txt
W=/tmp/whl/mamba_ssm-2.3.2.post1-cp312-cp312-linux_x86_64.whl
python3 -c 'import torch, selective_scan_cuda' 2>/dev/null || (mkdir -p /tmp/whl && cat .dev/wheels/*.part-* > $W && python3 -m pip install -q --no-deps --no-index $W 2>&1 | tail -1)
python3 -c 'import selective_scan_cuda, torch, triton; print("mamba ok", torch.__version__, triton.__version__, torch.cuda.get_device_name())' | tee $L
date -u | tee -a $L
timeout 110 python3 benchmarks/gpu_checks.py scan_variants --out $OUT/variants.json 2>&1 | grep -v -i warn | tee -a $L
CH=$(tail -1 $L | grep '^VMRNN_SS2D_CK=' || echo "VMRNN_SS2D_CK=64 VMRNN_SS2D_UB=4 VMRNN_SS2D_RECOMP=1")
echo "chosen: $CH" | tee -a $L
export $CH
B="python3 -m vmrnn bench --warmup 2 --iters 8 --check"
timeout 200 $B --presets taxibj --modes fp32-fused-graphs,bf16,fast,fast-compile --curve 300 --curve-presets taxibj --curve-modes fast --curve-ref fp32-fused-graphs --json $OUT/b_taxibj.json 2>&1 | grep -v -i warn | tail -12 | tee -a $L
timeout 170 $B --presets kth --modes fp32-fused-graphs,bf16-graphs,fast,fast-ckpt --json $OUT/b_kth.json 2>&1 | grep -v -i warn | tail -10 | tee -a $L
date -u | tee -a $L
