"""shared_mesh_slices: one DeviceMesh per slice inside the block, torch's own methods outside it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import datetime, socket
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from elastic.runtime.parallel.mesh_cache import shared_mesh_slices

    sock = socket.socket(); sock.bind(("127.0.0.1", 0)); port = sock.getsockname()[1]; sock.close()
    store = dist.TCPStore("127.0.0.1", port, 1, True, timeout=datetime.timedelta(seconds=30))
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    mesh = init_device_mesh("cpu", (1, 1, 1), mesh_dim_names=("dp", "fsdp", "tp"))
    getitem, concatenate = DeviceMesh.__dict__["__getitem__"], DeviceMesh.__dict__["_concatenate"]
    plain = mesh["dp", "fsdp"]
    assert mesh["tp"] is not mesh["tp"]  # torch builds a new mesh per slice
    with shared_mesh_slices():
        a, b = mesh["dp", "fsdp"], mesh[("dp", "fsdp")]
        assert a is b and a.mesh_dim_names == plain.mesh_dim_names and a.get_group(1) == plain.get_group(1)
        assert mesh["tp"] is mesh["tp"] and mesh["tp"] is not mesh["fsdp"]
        joined = DeviceMesh._concatenate([a, mesh["tp"]])
        assert joined is DeviceMesh._concatenate([a, mesh["tp"]]) and joined.mesh_dim_names == ("dp", "fsdp", "tp")
    assert DeviceMesh.__dict__["__getitem__"] is getitem and DeviceMesh.__dict__["_concatenate"] is concatenate
    try:
        with shared_mesh_slices():
            raise KeyError("boom")
    except KeyError:
        pass
    assert DeviceMesh.__dict__["__getitem__"] is getitem  # restored on errors too
    dist.destroy_process_group()
    print("ok")
""")


def test_slices_are_shared_inside_and_torch_is_restored_after():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
