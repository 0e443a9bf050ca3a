#!/bin/bash
# Two "nodes" of 2 processes each on this machine, c10d rendezvous on the loopback address.
cd /tmp/probe
export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore
CASES=plain:sgd:1,global:sgd:1,group_rs:sgd:1,group_unsharded:sgd:1,device:sgd:1,global:sgd:2,group_rs:adamw:2,group_unsharded:sgd:2,device:adamw:2,global:adamw:1:resume,group_rs:sgd:2:resume
PORT=${PORT:-29640}
start=$(date +%s.%N)
torchrun --nnodes 2 --nproc_per_node 2 --node_rank 0 --rdzv_backend c10d --rdzv_endpoint 127.0.0.1:$PORT --rdzv_id sam_hsdp hsdp_sam.py $CASES twonode > out_hsdp_node0.txt 2>&1 &
p0=$!
torchrun --nnodes 2 --nproc_per_node 2 --node_rank 1 --rdzv_backend c10d --rdzv_endpoint 127.0.0.1:$PORT --rdzv_id sam_hsdp hsdp_sam.py $CASES twonode > out_hsdp_node1.txt 2>&1 &
p1=$!
wait $p0; rc0=$?
wait $p1; rc1=$?
end=$(date +%s.%N)
echo "rc node0=$rc0 node1=$rc1 wall=$(echo "$end - $start" | bc) s"
