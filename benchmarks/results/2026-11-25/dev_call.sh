set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
W=/tmp/whl/mamba_ssm-2.3.2.post1-cp312-cp312-linux_x86_64.whl
python3 -c 'import torch, selective_scan_cuda' 2>/dev/null || (mkdir -p /tmp/whl && cat .dev/wheels/*.part-* > $W && python3 -m pip install -q --no-deps --no-index $W 2>&1 | tail -1)
L=$OUT/log.txt
timeout 120 python3 -m pytest tests/test_ss2d_chunked_scan.py tests/test_fused_ss2d.py -m gpu -q -p no:cacheprovider -x 2>&1 | tail -8 | tee -a $L
timeout 90 python3 .dev/dev2.py scan 2>&1 | grep -v -i warn | tee -a $L
timeout 60 python3 .dev/dev2.py prof 2>&1 | grep -v -i warn | tee -a $L
timeout 200 python3 .dev/dev2.py model 2>&1 | grep -v -i warn | tee -a $L
