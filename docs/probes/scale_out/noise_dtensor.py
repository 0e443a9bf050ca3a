"""Recipe for variants that draw noise (rsam, rwp) on FSDP2/HSDP: draw the FULL-shape noise with the same
generator on every rank (as the single-process run draws it), then keep this rank's chunk with
distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None) (no communication).
Check: the chunk equals the rank's local shard of a parameter holding those values (uneven 13 -> 7/6 rows too),
on a 1-D mesh (2 ranks: WORLD=2) and on a 2x2 HSDP mesh (4 ranks)."""
import copy, json, os, sys, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import distribute_tensor, DTensor
from torch.distributed.tensor.debug import CommDebugMode
from pcommon import tiny
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard")) if world == 4 else init_device_mesh("cpu", (world,))
model = tiny(); fully_shard(model.fc1, mesh=mesh); fully_shard(model, mesh=mesh)
ok, comm = [], {}
gen = torch.Generator().manual_seed(123)
for p in model.parameters():
    full = torch.randn(p.shape, generator=gen)
    with CommDebugMode() as cdm:
        loc = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()
    comm.update({str(k): v for k, v in cdm.get_comm_counts().items()})
    with torch.no_grad():  # put the same values into the sharded parameter through FSDP's own layout
        p.copy_(distribute_tensor(full, p.device_mesh, p.placements))
    ok.append(torch.equal(loc, p.to_local()) and torch.equal(p.full_tensor(), full))
    ok.append(tuple(loc.shape))
if rank == 0 or rank == world - 1:
    print("RESULT", json.dumps({"rank": rank, "world": world, "placements": str(p.placements), "checks": ok,
                                "comms_of_distribute_src_None": comm}), flush=True)
dist.destroy_process_group()
