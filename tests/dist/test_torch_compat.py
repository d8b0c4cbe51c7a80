"""One test per private-torch shim in ``elastic/runtime/torch_compat.py``: each checks that torch still
has what the shim relies on, and that the reason for the shim still holds, so a torch upgrade fails
here, by name, rather than somewhere deep in a reshard.

A one-rank gloo group in this process (no Ray); the module's fixture tears it down again.
"""

from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from elastic.runtime import torch_compat as tc


@pytest.fixture(scope="module")
def mesh():
    assert not dist.is_initialized(), "another test left a default process group behind"
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=30))
    try:
        yield init_device_mesh("cpu", (1, 1), mesh_dim_names=("fsdp", "tp"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_torch_is_the_tested_release():
    assert torch.__version__.startswith(tc.TESTED_TORCH), (
        f"torch {torch.__version__} is not {tc.TESTED_TORCH}.x, the release torch_compat's shims are tested on; "
        "run tests/dist/test_torch_compat.py and widen pyproject's torch range only if it passes")


def test_local_tensor_is_the_storage_owning_shard(mesh):
    d = distribute_tensor(torch.arange(6.0).reshape(3, 2), mesh["tp"], [Shard(0)])
    local = tc.local_tensor(d)
    assert local is d._local_tensor and local is tc.local_tensor(d)  # the same object on every call
    assert d.to_local() is not d.to_local(), "to_local() now returns a stable object: the shim may be dropped"
    assert local.data_ptr() == d.to_local().data_ptr()
    plain = torch.ones(2)
    assert tc.local_tensor(plain) is plain


def test_strided_shard_is_recognised_and_still_not_a_shard():
    from torch.distributed.tensor.placement_types import _StridedShard

    strided = _StridedShard(0, split_factor=2)
    assert tc.is_strided_shard(strided) and not tc.is_strided_shard(Shard(0))
    assert not strided.is_shard() or not isinstance(strided, Shard), "is_strided_shard may now be is_shard()"


def test_placed_linear_style_places_the_module_and_its_children(mesh):
    class Adapted(nn.Linear):  # a LoRALinear's shape: the base weight plus lora_A / lora_B children
        def __init__(self):
            super().__init__(4, 6, bias=False)
            self.lora_A, self.lora_B = nn.Linear(4, 2, bias=False), nn.Linear(2, 6, bias=False)

    holder = nn.Module()
    holder.proj, holder.down = Adapted(), Adapted()
    assert hasattr(ColwiseParallel, "_partition_linear_fn"), "ParallelStyle lost _partition_linear_fn"
    parallelize_module(holder, mesh["tp"], {
        "proj": tc.placed_linear_style(ColwiseParallel, {"": Shard(0), "lora_A": Replicate(), "lora_B": Shard(0)}),
        "down": tc.placed_linear_style(RowwiseParallel, {"": Shard(1), "lora_A": Shard(1), "lora_B": Replicate()}),
    })
    got = {name: p.placements for name, p in holder.named_parameters()}
    assert got == {"proj.weight": (Shard(0),), "proj.lora_A.weight": (Replicate(),), "proj.lora_B.weight": (Shard(0),),
                   "down.weight": (Shard(1),), "down.lora_A.weight": (Shard(1),), "down.lora_B.weight": (Replicate(),)}


def test_mesh_slices_are_shared_inside_and_torch_is_restored_after(mesh):
    mesh = init_device_mesh("cpu", (1, 1, 1), mesh_dim_names=("dp", "fsdp", "tp"))
    getitem, concatenate = DeviceMesh.__dict__["__getitem__"], DeviceMesh.__dict__["_concatenate"]
    plain = mesh["dp", "fsdp"]
    assert mesh["tp"] is not mesh["tp"], "torch now caches mesh slices itself: shared_mesh_slices may be dropped"
    with tc.shared_mesh_slices():
        a, b = mesh["dp", "fsdp"], mesh[("dp", "fsdp")]
        assert a is b and a.mesh_dim_names == plain.mesh_dim_names and a.get_group(1) == plain.get_group(1)
        assert mesh["tp"] is mesh["tp"] and mesh["tp"] is not mesh["fsdp"]
        joined = DeviceMesh._concatenate([a, mesh["tp"]])
        assert joined is DeviceMesh._concatenate([a, mesh["tp"]]) and joined.mesh_dim_names == ("dp", "fsdp", "tp")
    assert DeviceMesh.__dict__["__getitem__"] is getitem and DeviceMesh.__dict__["_concatenate"] is concatenate
    with pytest.raises(KeyError), tc.shared_mesh_slices():
        raise KeyError("boom")
    assert DeviceMesh.__dict__["__getitem__"] is getitem  # restored on errors too


def _pair_of_groups(tag: str):
    """Two one-rank gloo groups made without touching the default group, told they are global ranks 5 and 7."""
    timeout = datetime.timedelta(seconds=30)
    return [tc.new_gloo_group(dist.HashStore(), 0, 1, f"{tag}/{g}", [g], timeout) for g in (5, 7)]


def test_groups_form_switch_and_go_without_a_default_group():
    from torch.distributed import distributed_c10d as c10d

    before = c10d._world.default_pg
    a, b = _pair_of_groups("compat-switch")
    try:
        assert dist.get_process_group_ranks(a) == [5] and dist.get_process_group_ranks(b) == [7]
        assert c10d._world.pg_names[a] == "compat-switch/5" and c10d._resolve_process_group("compat-switch/7") is b
        tc.set_default_group(a)
        assert c10d._get_default_group() is a and dist.get_world_size() == 1
        tc.destroy_group(a)  # the default one: no default is left, b stays registered
        assert c10d._world.default_pg is None and a not in c10d._world.pg_map and b in c10d._world.pg_map
        tc.destroy_group(b)
        assert b not in c10d._world.pg_map
    finally:
        tc.set_default_group(before)


def test_a_thread_sees_its_own_default_group():
    import threading

    from torch.distributed import distributed_c10d as c10d

    before = c10d._world.default_pg
    a, b = _pair_of_groups("compat-thread")
    seen = {}
    try:
        tc.set_default_group(a)

        def build():
            with tc.default_group_on_this_thread(b):
                seen["inside"] = c10d._get_default_group()
                seen["main meanwhile"] = main_view.wait(5) and c10d._world.default_pg
            seen["after"] = c10d._get_default_group()

        main_view = threading.Event()
        thread = threading.Thread(target=build)
        thread.start()
        seen["main"] = c10d._get_default_group()  # the main thread sees the real default throughout
        main_view.set()
        thread.join(10)
        assert seen == {"inside": b, "main meanwhile": b, "after": a, "main": a}
    finally:
        tc.set_default_group(before)
        for pg in (a, b):
            tc.destroy_group(pg)


def test_a_mesh_over_given_groups_takes_the_rank_it_is_told():
    a, b = _pair_of_groups("compat-mesh")
    try:
        grid = torch.arange(2, dtype=torch.int).reshape(1, 2)  # this process is rank 1 of a 1 x 2 world
        mesh = tc.mesh_over_groups([a, b], grid, ("dp", "tp"), rank=1)
        assert list(mesh.get_coordinate()) == [0, 1]  # from the rank it was told, not c10d's default group
        assert mesh.get_group("dp") is a and mesh.get_group("tp") is b
    finally:
        for pg in (a, b):
            tc.destroy_group(pg)


def test_meshes_over_other_groups_differ():
    a, b = _pair_of_groups("compat-eq")
    c, d = _pair_of_groups("compat-eq2")
    try:
        grid = torch.zeros(1, 1, dtype=torch.int)
        one, same, other = (tc.mesh_over_groups(g, grid, ("dp", "tp"), rank=0) for g in ([a, b], [a, b], [c, d]))
        tc.meshes_differ_by_group()  # installed for the rest of this process, as in every worker
        assert one == same and hash(one) == hash(same)
        assert one != other and hash(one) != hash(other)
        assert one["tp"] != other["tp"], "slices of two worlds compare equal"
        torch_eq, torch_key = tc._TORCH_MESH_EQ
        assert torch_eq(one, other) and torch_key(one) == torch_key(other), (
            "torch's DeviceMesh now tells groups apart: meshes_differ_by_group may be dropped")
    finally:
        for pg in (a, b, c, d):
            tc.destroy_group(pg)
