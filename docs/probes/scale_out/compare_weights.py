"""Compare the final weights of the single-launch HSDP run (tag single) with the two-node launch (tag twonode)."""
import glob, torch
for f in sorted(glob.glob("/tmp/probe/weights_single_*.pt")):
    g = f.replace("weights_single_", "weights_twonode_")
    a, b = torch.load(f), torch.load(g)
    bit = all(torch.equal(x, y) for x, y in zip(a, b))
    dev = max((x - y).abs().max().item() for x, y in zip(a, b))
    print(f.split("weights_single_")[1][:-3], "bit-identical" if bit else "differs", dev)
