"""The architecture's rules (docs/architecture.md), read from the source: imports, private state, the
tensor ops variants call directly, and the README's variants table generated from the registry."""

import ast
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from hf_sam.sharded import SHARDED_VARIANTS
from hf_sam.variants import get_variant, variants_markdown

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hf_sam"


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
TREES = {name: ast.parse(path.read_text(), filename=str(path)) for name, path in MODULES.items()}


def imports(name: str) -> set[str]:
    """Every module `name` imports (anywhere in the file, lazy imports too), as absolute names.

    `from X import y` counts as an import of X.y when that is a module of the package, else of X.
    """
    is_package = MODULES[name].name == "__init__.py"
    base = name.split(".") if is_package else name.split(".")[:-1]
    out = set()
    for node in ast.walk(TREES[name]):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[:len(base) - node.level + 1]
                target = ".".join(anchor + ([node.module] if node.module else []))
            else:
                target = node.module
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.add(sub if sub in MODULES else target)
    return out


def internal(name: str) -> set[str]:
    return {m for m in imports(name) if m in MODULES}


def third_party(name: str) -> set[str]:
    return {m.split(".")[0] for m in imports(name) if not m.startswith("hf_sam")}


VARIANT_MODULES = [m for m in MODULES if m.startswith("hf_sam.variants.")]


# ---- the reader works ---------------------------------------------------------------------------
def test_the_import_reader_resolves_relative_imports():
    assert "hf_sam.ops" in internal("hf_sam.step")
    assert "hf_sam.variants.registry" in internal("hf_sam.variants.sam")
    assert "hf_sam.ops" in internal("hf_sam.variants.aesam")  # from .. import ops
    assert "hf_sam.variants.sam" in internal("hf_sam.variants")  # from . import sam
    assert "transformers" in third_party("hf_sam.trainer")
    assert len(VARIANT_MODULES) >= 15


# ---- import rules -------------------------------------------------------------------------------
def test_the_engine_imports_no_variant_no_config_no_transformers_no_backend():
    """step.py and what it imports: no variant, no config, not transformers, no front-end or backend."""
    seen, todo = set(), ["hf_sam.step"]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo.extend(internal(m))
    forbidden = {m for m in seen if m.startswith("hf_sam.variants") or m in (
        "hf_sam.config", "hf_sam.trainer", "hf_sam.optim", "hf_sam.sharded", "hf_sam.cards", "hf_sam.sharpness")}
    assert not forbidden, f"the engine reaches {sorted(forbidden)}"
    for m in seen:
        assert "transformers" not in third_party(m), f"{m} (imported by the engine) imports transformers"


ALLOWED_IN_VARIANTS = {"hf_sam.ops", "hf_sam.losses"}


def test_variants_import_only_ops_losses_and_their_own_package():
    for m in VARIANT_MODULES:
        bad = {x for x in internal(m) if x not in ALLOWED_IN_VARIANTS and not x.startswith("hf_sam.variants")}
        assert not bad, f"{m} imports {sorted(bad)}; variants import only ops, losses, common, the registry"


def test_nothing_in_the_package_imports_scripts_or_benchmarks():
    for m in MODULES:
        roots = {x.split(".")[0] for x in imports(m)}
        assert not roots & {"scripts", "benchmarks", "_common", "bench", "tests"}, m
        assert "sys.path" not in MODULES[m].read_text(), f"{m} edits sys.path"


def test_no_import_cycle():
    graph = {m: internal(m) - {m} for m in MODULES}
    # a package's __init__ imports its submodules; a submodule importing the bare package name would
    # close a cycle, so the package nodes stay in the graph
    state = {}

    def visit(m, path):
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                cycle = path[path.index(n):] + [n]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n, path + [n])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_the_cycle_check_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}}
    state = {}

    def visit(m, path):
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                return path[path.index(n):] + [n]
            if n not in state:
                found = visit(n, path + [n])
                if found:
                    return found
        state[m] = "done"
        return None

    assert visit("a", ["a"]) == ["a", "b", "c", "a"]


# ---- no module writes another's private state ----------------------------------------------------
def _private_writes(tree):
    """(line, text) of assignments to `<x>._name` where x is not self or cls."""
    out = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        for t in targets:
            for sub in ast.walk(t):
                if isinstance(sub, ast.Attribute) and sub.attr.startswith("_") and not sub.attr.startswith("__") \
                        and not (isinstance(sub.value, ast.Name) and sub.value.id in ("self", "cls")):
                    out.append((node.lineno, ast.unparse(sub)))
    return out


# torch's FSDP2 has no public setter for one module's reshard-after-forward value: the backend puts
# back what it found (hf_sam/sharded.py, _fsdp_pass)
TORCH_PRIVATE_RESTORED = {("hf_sam.sharded", "state._auto_reshard_after_forward")}


def test_no_module_writes_another_objects_private_attributes():
    found = {m: [w for w in _private_writes(tree) if (m, w[1]) not in TORCH_PRIVATE_RESTORED]
             for m, tree in TREES.items()}
    found = {m: w for m, w in found.items() if w}
    assert not found, found


def test_the_private_write_check_sees_one():
    assert _private_writes(ast.parse("ctx._moved = False\nself._ok = 1\nctx.params = []")) == [(1, "ctx._moved")]


def test_nothing_outside_the_engine_reads_the_step_contexts_private_state():
    for m, tree in TREES.items():
        if m == "hf_sam.step":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and isinstance(node.value, ast.Name) \
                    and node.value.id in ("ctx", "sel", "selection"):
                raise AssertionError(f"{m}:{node.lineno} reads {ast.unparse(node)}")
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith(
                    ("_hf_sam_", "_sam_sharding", "_sam_sharded_step")):
                raise AssertionError(f"{m}:{node.lineno} uses the attribute name {node.value!r}")


# ---- the tensor-op rule for variants (hf_sam/step.py's docstring) ---------------------------------
# Elementwise multi-tensor ops: on lists aligned with ctx.params they act shard by shard on DTensors.
ELEMENTWISE_FOREACH = {f"_foreach_{op}{inplace}" for op in (
    "add", "sub", "mul", "div", "neg", "sqrt", "abs", "sign", "addcmul", "addcdiv", "zero", "lerp", "maximum",
    "minimum", "clamp_min", "clamp_max", "exp", "reciprocal") for inplace in ("", "_")}
# What sums across a tensor or across processes: only ops (global_norm, global_dot) and the context.
REDUCTIONS = {"sum", "mean", "norm", "vector_norm", "cat", "topk", "item", "tolist", "flatten", "max", "min",
              "amax", "amin", "argmax", "sort", "nonzero", "dot", "vdot", "std", "var", "prod", "all_reduce"}


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_variants_call_only_elementwise_foreach_ops_and_no_collective():
    for m in VARIANT_MODULES:
        for node, name in _calls(TREES[m]):
            if name.startswith("torch._foreach_"):
                assert name[len("torch."):] in ELEMENTWISE_FOREACH, f"{m}:{node.lineno} calls {name}: reductions " \
                    "go through hf_sam.ops (global_norm, global_dot)"
            assert not name.startswith(("torch.distributed", "dist.", "torch.linalg")), \
                f"{m}:{node.lineno} calls {name}: collectives go through the context (ctx.mean_over_processes)"
            assert name not in ("torch.norm", "torch.dot", "torch.vdot"), f"{m}:{node.lineno} calls {name}"


def test_variants_that_run_sharded_reduce_only_through_ops():
    """The variants FSDP2 and DeepSpeed run (hf_sam.sharded.SHARDED_VARIANTS) hold DTensors: no
    per-tensor reduction, reshape or host read in their modules."""
    modules = {get_variant(v).step.__module__ for v in SHARDED_VARIANTS}
    assert "hf_sam.variants.sam" in modules
    for m in sorted(modules):
        for node, name in _calls(TREES[m]):
            if "." not in name:  # a Python builtin or a local function (max over floats)
                continue
            last = name.rsplit(".", 1)[-1]
            assert last not in REDUCTIONS | {"reshape", "view"}, f"{m}:{node.lineno} calls {name} on sharded tensors"


WORKER = textwrap.dedent("""
    import sys
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", rank=int(sys.argv[1]), world_size=2, init_method="file://" + sys.argv[2])
    mesh = init_device_mesh("cpu", (2,))
    g = torch.Generator().manual_seed(0)
    lists = {"base": [torch.rand(6, 3, generator=g) + 0.5, torch.rand(4, generator=g) + 0.5],
             "other": [torch.randn(6, 3, generator=g), torch.randn(4, generator=g)]}
    scalar = torch.tensor(1.5)  # a plain 0-dim device tensor (a global norm, a projection coefficient)

    def shard(ts):
        return [distribute_tensor(t.clone(), mesh, [Shard(0)]) for t in ts]

    mismatches = []
    for op, args in [("_foreach_add_", ["other"]), ("_foreach_add", ["other"]), ("_foreach_sub_", ["other"]),
                     ("_foreach_sub", ["other"]), ("_foreach_mul_", ["other"]), ("_foreach_mul", ["other"]),
                     ("_foreach_mul_", [2.0]), ("_foreach_mul_", [scalar]), ("_foreach_div_", ["base"]),
                     ("_foreach_div", ["base"]), ("_foreach_addcmul_", ["other", "base"]), ("_foreach_sqrt", []),
                     ("_foreach_neg_", [])]:
        plain, dt = [t.clone() for t in lists["base"]], shard(lists["base"])
        p_args = [[t.clone() for t in lists[a]] if isinstance(a, str) else a for a in args]
        d_args = [shard(lists[a]) if isinstance(a, str) else a for a in args]
        out_p, out_d = getattr(torch, op)(plain, *p_args), getattr(torch, op)(dt, *d_args)
        want, got = (plain if out_p is None else out_p), (dt if out_d is None else out_d)
        if not all(torch.equal(x.full_tensor(), y) for x, y in zip(got, want)):
            mismatches.append(op)
    import importlib.util  # hf_sam.ops alone: the package's __init__ would import transformers
    spec = importlib.util.spec_from_file_location("ops", sys.argv[3])
    ops = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ops)
    norm = float(ops.global_norm(shard(lists["other"])))
    dot = float(ops.global_dot(shard(lists["other"]), shard(lists["base"])))
    flat = [torch.cat([t.reshape(-1) for t in lists[k]]) for k in ("other", "base")]
    err = max(abs(norm - float(flat[0].norm())), abs(dot - float(flat[0] @ flat[1])))
    if int(sys.argv[1]) == 0:
        print("RESULT", ",".join(mismatches) or "-", err)
    dist.destroy_process_group()
""")


def test_the_rule_holds_on_sharded_tensors(tmp_path):
    """Two processes, DTensors sharded on dim 0: every elementwise foreach op the variants use gives the
    full-tensor result; a reduction through hf_sam.ops gives the global value."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    store = str(tmp_path / "store")
    procs = [subprocess.Popen([sys.executable, str(script), str(r), store, str(PACKAGE / "ops.py")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    _, mismatches, err = next(x for x in outs[0][0].splitlines() if x.startswith("RESULT")).split()
    assert mismatches == "-", f"elementwise ops that differ on DTensors: {mismatches}"
    assert float(err) <= 1e-5


# ---- one source for variant facts ----------------------------------------------------------------
README = (ROOT / "README.md").read_text()


def test_the_readme_variants_table_is_generated_from_the_registry():
    assert variants_markdown() in README, "README variants table is stale: paste hf_sam.variants.variants_markdown()"


def test_every_builtin_variant_has_its_facts_and_a_row():
    table = variants_markdown()
    from hf_sam.variants.registry import _REGISTRY

    builtin = [v for v in _REGISTRY.values() if v.step.__module__.startswith("hf_sam.variants.")]
    assert len(builtin) >= 21
    for v in builtin:
        assert v.facts is not None, f"{v.name}: register(..., facts=Facts(...))"
        assert f"| `{v.name}` |" in table
        assert v.facts.memory and v.facts.passes


def test_a_stale_fact_is_seen(monkeypatch):
    from hf_sam.variants import registry

    sam = registry.get_variant("sam")
    monkeypatch.setitem(registry._REGISTRY, "sam",
                        registry.Variant(**{**sam.__dict__,
                                            "facts": registry.Facts(sam.facts.paper, sam.facts.settings,
                                                                    sam.facts.passes, "7 | copies")}))
    table = variants_markdown()
    assert "7 \\| copies" in table and table not in README


@pytest.mark.parametrize("name", ["sam", "asam", "gsam"])
def test_the_readme_memory_cell_is_the_registrys(name):
    row = next(line for line in README.splitlines() if line.startswith(f"| `{name}` |"))
    assert row.rstrip().endswith(f"| {get_variant(name).facts.memory.replace('|', chr(92) + '|')} |")
