set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
L=$OUT/log_b.txt
date -u | tee -a $L
B="python3 -m vmrnn bench --warmup 2 --iters 6 --check"
timeout 75 $B --presets kth --modes fast --json $OUT/b_kth2.json 2>&1 | grep -v -i warn | tail -3 | tee -a $L
timeout 110 $B --presets mmnist --modes fast,fast-ckpt --json $OUT/b_mmnist.json 2>&1 | grep -v -i warn | tail -4 | tee -a $L
timeout 60 $B --presets mmnist-openstl --modes fast --json $OUT/b_mmnist_openstl.json 2>&1 | grep -v -i warn | tail -3 | tee -a $L
date -u | tee -a $L
