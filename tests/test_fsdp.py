"""SAMTrainer on FSDP2: two gloo processes on the CPU (tests/fsdp_worker.py); set-up checks and
refusals for FSDP and DeepSpeed (no processes).

One launch of the worker runs every trainer below in one process pair (~40 s on two busy cores); the
references are single-process plain-torch implementations of the variants' equations (in the worker).
"""

import logging
from types import SimpleNamespace

import pytest

from fsdp_worker import launch
from hf_sam import SAMConfig, sharded
from hf_sam.cards import _ascent

# one launch, one trainer after another (the first check runs before any trainer is forced onto FSDP2)
CHECKS = ["cpu_asked_fsdp", "ops", "sam_global_1", "sam_global_2", "sam_local_1", "sam_local_2", "asam_global_1",
          "asam_local_1", "gsam_global_1", "gsam_local_1", "looksam_global_1", "looksam_local_1", "fsam_global_1",
          "fsam_local_1", "rwp_global_1", "rwp_local_1", "rsam_global_1", "resume", "restored",
          # hf_sam.SAM (the closure optimizer) on a model sharded with fully_shard before the optimizer
          "closure_sam_global_1_nomodel", "closure_sam_global_2", "closure_sam_local_2", "closure_rsam_global_1",
          "closure_rwp_global_1", "closure_rwp_local_1", "closure_refuse_local_nomodel",
          "bf16"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return launch("fsdp_worker.py", tmp_path_factory.mktemp("fsdp"), CHECKS, 29621, "fsdp")


def test_global_ascent_is_the_default_and_exact_for_ga_1_and_2(results):
    for name in ("sam_global_1", "sam_global_2"):
        r = results[name]
        assert r["sync_ascent"] is True  # sync_ascent left unset: global ascent under FSDP
        assert r["dev_vs_global"] <= 1e-5, (name, r)
        assert r["dev_vs_local"] > 1e-3, (name, r)  # the test tells the two modes apart
        assert r["sharded"] and r["wte_local_rows"] == 51  # vocabulary 101 over 2 ranks: 51 + 50 rows
    assert results["sam_global_2"]["distinct_micro_batches"] == 12  # 3 steps x 2 micro-batches x 2 ranks


def test_per_device_ascent_is_exact_and_differs_from_global(results):
    for name in ("sam_local_1", "sam_local_2", "asam_local_1"):
        r = results[name]
        assert r["sync_ascent"] is False
        assert r["dev_vs_local"] <= 1e-5, (name, r)
        assert r["dev_vs_global"] > 1e-3, (name, r)
        assert r["sharded"]


def test_collectives_per_micro_batch(results):
    glob = results["sam_global_1"]["collectives_per_micro_batch"][0]
    local = results["sam_local_1"]["collectives_per_micro_batch"][0]
    # per-device ascent: the descent pass reuses the parameters the clean pass gathered
    assert glob["all_gather"] == 2 * local["all_gather"] and glob["reduce_scatter"] == 2 * local["reduce_scatter"]
    assert local["all_reduce"] == 0
    assert glob["all_reduce"] == 1  # the ascent norm, one scalar (the metric ||e|| = scale ||g|| reuses it)


def test_sharded_norm_and_dot_count_a_replicated_tensor_once(results):
    r = results["ops"]
    assert r["norm_err"] < 1e-5 and r["dot_err"] < 1e-4 and r["plain_result"]


def test_weights_come_back_bit_for_bit(results):
    assert results["restored"] == {"sync1_bitwise_equal": True, "sync0_bitwise_equal": True}


def test_asam_under_fsdp(results):
    assert results["asam_global_1"]["dev_vs_global"] <= 1e-5


def test_fsdp_requested_on_cpu_is_refused(results):
    assert "accelerate set up" in results["cpu_asked_fsdp"]["refused"]
    assert "FSDP was requested" in results["cpu_asked_fsdp"]["refused"]


def test_gsam_looksam_fsam_under_fsdp(results):
    for name in ("gsam_global_1", "looksam_global_1", "fsam_global_1"):
        assert results[name]["dev_vs_global"] <= 1e-5, (name, results[name])
    for name in ("gsam_local_1", "looksam_local_1", "fsam_local_1"):  # explicit descent gradients: gsam, looksam
        assert results[name]["dev_vs_local"] <= 1e-5, (name, results[name])
    assert results["fsam_local_1"]["dev_vs_global"] > 1e-3


def test_noise_variants_in_the_trainer(results):
    """rwp (both modes) and rsam (global) under SAMTrainer on FSDP2: the noise of one process, cut to the shards."""
    for name, mode in [("rwp_global_1", "global"), ("rwp_local_1", "local"), ("rsam_global_1", "global")]:
        assert results[name]["dev_vs_" + mode] <= 1e-6, (name, results[name])
    assert results["rwp_global_1"]["dev_vs_local"] > 1e-3 and results["rwp_local_1"]["dev_vs_global"] > 1e-3


def test_resume_equals_uninterrupted_run(results):
    r = results["resume"]
    assert r["resume_vs_uninterrupted"] <= 1e-6
    assert r["first_run_moved"] > 1e-4  # the 2-step run stopped elsewhere: the resume did the work
    assert {"sam_state_rank0.pt", "sam_state_rank1.pt", "pytorch_model_fsdp_0"} <= set(r["ckpt_files"])


def test_closure_optimizer_on_fully_shard_modules_both_modes(results):
    """hf_sam.SAM: global ascent by default (model= or not), sync_ascent=False per device; exact."""
    for name, mode, other in [("closure_sam_global_1_nomodel", "global", "local"),
                              ("closure_sam_global_2", "global", "local"), ("closure_sam_local_2", "local", "global")]:
        r = results[name]
        assert r["sharded"], (name, r)
        assert r[f"dev_vs_{mode}"] <= 1e-6, (name, r)
        assert r[f"dev_vs_{other}"] > 1e-3, (name, r)  # sync_ascent is honoured, not ignored
        assert not any("DDP" in w for w in r["warnings"]), (name, r["warnings"])  # no DDP advice on FSDP
        assert r["metrics"]["sam/perturbation_norm"] == pytest.approx(0.5)


def test_noise_variants_on_dtensor_shards(results):
    """rsam, rwp: the noise drawn in full and cut to the shard equals one process's draw."""
    for name, mode, other in [("closure_rsam_global_1", "global", "local"), ("closure_rwp_global_1", "global", "local"),
                              ("closure_rwp_local_1", "local", "global")]:
        r = results[name]
        assert r[f"dev_vs_{mode}"] <= 1e-6, (name, r)
        assert r[f"dev_vs_{other}"] > 1e-3, (name, r)


def test_bf16_mixed_precision_policy(results):
    """param_dtype bf16, reduce_dtype fp32: the fp32 shards, the fp32 norm; exact vs a bf16 reference, restored bitwise."""
    r = results["bf16"]
    assert r["shard_dtype"] == "torch.float32"
    assert r["dev_vs_bf16_ref"] <= 1e-6 and r["dev_vs_plain"] > 1e-3, r
    assert r["restored_bitwise"] is True


def test_closure_per_device_without_model_is_refused(results):
    msg = results["closure_refuse_local_nomodel"]["refused"]
    assert msg and "sync_ascent=False" in msg and "model=" in msg


# ---- set-up checks without processes ---------------------------------------------------------------
def _fake(kind=None, version=2, variant="sam", sync=None, fsdp=False, deepspeed=None, processes=2):
    plugin = SimpleNamespace(fsdp_version=version) if kind == "fsdp" else None
    ds_plugin = SimpleNamespace(deepspeed_config=deepspeed) if kind == "deepspeed" else None
    acc = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin, deepspeed_plugin=ds_plugin),
                          num_processes=processes, distributed_type="MULTI_CPU")
    return SimpleNamespace(is_deepspeed_enabled=kind == "deepspeed", is_fsdp_enabled=kind == "fsdp",
                           accelerator=acc, args=SimpleNamespace(fsdp=fsdp, deepspeed=deepspeed),
                           sam_config=SAMConfig(variant=variant, sync_ascent=sync))


def _setup_args(*a, **k):
    tr = _fake(*a, **k)
    sharded.check(tr)
    return tr, tr.sam_config


def test_refusals_name_the_fix(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    with pytest.raises(ValueError, match="fsdp_version: 2"):
        sharded.setup(*_setup_args("fsdp", version=1, fsdp=True))
    zero2 = {"zero_optimization": {"stage": 2}}
    assert sharded.setup(*_setup_args("deepspeed", deepspeed=zero2)).sync_ascent is None  # per-device, as DDP
    with pytest.raises(ValueError, match="ZeRO stages 1 and 2 .got stage 3"):
        sharded.setup(*_setup_args("deepspeed", deepspeed={"zero_optimization": {"stage": 3}}))
    with pytest.raises(ValueError, match="offload_optimizer"):
        sharded.setup(*_setup_args("deepspeed", deepspeed={"zero_optimization": {
            "stage": 2, "offload_optimizer": {"device": "cpu"}}}))
    with pytest.raises(ValueError, match="fp16"):
        sharded.setup(*_setup_args("deepspeed", deepspeed={**zero2, "fp16": {"enabled": True}}))
    with pytest.raises(ValueError, match="'msam' is not supported under DeepSpeed"):
        sharded.setup(*_setup_args("deepspeed", variant="msam", deepspeed=zero2))
    with pytest.raises(ValueError, match="'rsam' runs under FSDP with global ascent only"):
        sharded.setup(*_setup_args("fsdp", variant="rsam", fsdp=True, sync=False))
    for where in ("deepspeed", None):  # sync_ascent='node' outside HSDP
        with pytest.raises(ValueError, match="sync_ascent='node'.*needs HSDP"):
            sharded.setup(*_setup_args(where, sync="node", deepspeed=zero2 if where else None))
    with pytest.raises(ValueError, match="'rwp' cannot use sync_ascent='node'"):
        sharded.setup(*_setup_args("fsdp", variant="rwp", fsdp=True, sync="node"))
    import torch

    from hf_sam import SAM
    with pytest.raises(ValueError, match="sync_ascent='node'.*needs HSDP"):  # the closure optimizer, one process
        SAM([torch.nn.Parameter(torch.ones(2))], torch.optim.SGD, config=SAMConfig(sync_ascent="node"),
            lr=0.1).step(lambda: torch.ones(()))
    with pytest.raises(ValueError, match="'esam' is not supported under FSDP"):
        sharded.setup(*_setup_args("fsdp", variant="esam", fsdp=True))
    with pytest.raises(ValueError, match="DeepSpeed was requested"):
        sharded.setup(*_setup_args(deepspeed="ds.json"))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # accelerate launch --config_file fsdp.yaml on a CPU
    with pytest.raises(ValueError, match="FSDP was requested"):
        sharded.setup(*_setup_args())
    assert sharded.setup(*_setup_args(processes=1)).sync_ascent is None  # one process: nothing to shard


def test_sync_ascent_default_depends_on_fsdp(caplog):
    tr = _fake("fsdp", fsdp=True)
    with caplog.at_level(logging.WARNING, logger="hf_sam.sharded"):
        tr.sam_sharding, cfg = sharded.configure(tr, tr.sam_config)  # the strategy SAMTrainer keeps
    assert cfg.sync_ascent is True and tr.sam_sharding.sync_ascent_auto
    assert "global ascent" in caplog.text
    tr.sam_config = cfg
    assert "the default under FSDP" in _ascent(tr)
    explicit = _fake("fsdp", fsdp=True, sync=False)
    assert sharded.setup(explicit, explicit.sam_config).sync_ascent is False
    ddp = _fake()
    ddp.args.fsdp = False
    assert sharded.setup(ddp, ddp.sam_config).sync_ascent is None  # DDP: None reads as per-device ascent
    assert "per device" in _ascent(ddp)
