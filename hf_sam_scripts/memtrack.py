"""Peak bytes of live tensor storage allocated inside a window, on any device (for the CPU bench).

`LiveBytes` is a TorchDispatchMode: every storage that an op returns for the first time is counted
with its nbytes until its Python storage object is collected (a weakref callback), and the peak of
the running total is kept. An output that shares the storage of one of the op's inputs (a view, an
in-place result) is not new memory. Storage that existed before the window (weights, optimizer
state) is not counted; what the window allocates and keeps or frees is. Autograd's backward ops are dispatched
through the mode too, so activations and gradients are counted.

    with LiveBytes() as mem:
        trainer.training_step(...); optimizer.step()
    mem.peak  # bytes
"""

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveBytes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs = {}  # id(weakref) -> weakref (keeps the weakrefs, and so their callbacks, alive)

    def _track(self, t):
        storage = t.untyped_storage()
        if getattr(storage, "_hf_sam_tracked", False):
            return
        nbytes = storage.nbytes()
        try:
            storage._hf_sam_tracked = True
        except AttributeError:  # storages that take no attributes: count once per object via the dict
            pass

        def release(ref, nbytes=nbytes):
            self.live -= nbytes
            self._refs.pop(id(ref), None)

        ref = weakref.ref(storage, release)
        self._refs[id(ref)] = ref
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {_key(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and _key(t) not in inputs:
                self._track(t)  # views and in-place results share an input's storage: not new memory
        return out


def reachable_tensor_bytes(device_type="cpu") -> int:
    """Bytes of the distinct storages of every tensor the garbage collector can see (weights, gradients,
    optimizer and variant state, data) on `device_type`: the baseline a step starts from."""
    import gc

    gc.collect()
    seen = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor):
            try:
                if obj.device.type != device_type:
                    continue
                key = _key(obj)
            except (RuntimeError, NotImplementedError):  # tensors without storage (meta, some subclasses)
                continue
            seen[key] = key[2]
    return sum(seen.values())


def _key(t):
    storage = t.untyped_storage()
    return storage.device, storage.data_ptr(), storage.nbytes()
