"""Every launch the Triton backend's host functions make, on small CPU tensors: ``exercise(dtype)`` calls each
entry point (linear, conv2d, batch_norm: forward and backward, Taylor scores on, bias on and off, training and
eval; linear and conv2d also under ``torch.autocast`` from fp32) once per case. Run it with the kernels' ``run``
replaced by a recorder (``tests.kernels.gpu_compile`` compiles what it records for real GPUs; tests check what
the host asks for): the outputs are then never computed. Leaves ``DENSE_SHORTCUT`` off in the three op modules.
"""
from __future__ import annotations

import torch


def exercise(dtype: torch.dtype) -> None:
    """Call every backend entry point once per case (the recorder swallows the launches)."""
    from eidetic_kernels.ops.batch_norm import triton as bn
    from eidetic_kernels.ops.conv2d import triton as conv
    from eidetic_kernels.ops.linear import triton as lin
    from eidetic_kernels.state import FREE, PRUNED, compact_rows, make_table, storage_slots

    lin.DENSE_SHORTCUT = conv.DENSE_SHORTCUT = bn.DENSE_SHORTCUT = False
    task = torch.tensor([0, FREE, 1, PRUNED, FREE, 0], dtype=torch.int16)
    slot = storage_slots(task).int()
    n_frozen = 3
    lo = torch.zeros_like(task)
    in_task = torch.tensor([0, 1, FREE, PRUNED, 0], dtype=torch.int16)
    for bias in (True, False):
        tw = torch.randn(3, 5, dtype=dtype, requires_grad=True)
        tb = torch.randn(3, dtype=dtype, requires_grad=True) if bias else None
        fw, fb = torch.randn(n_frozen, 5, dtype=dtype), torch.randn(n_frozen, dtype=dtype) if bias else None
        x = torch.randn(4, 5, dtype=dtype, requires_grad=True)
        table = make_table(in_task, task, lo)
        fw_c = compact_rows(torch.randn(6, 5, dtype=dtype), table.frozen_blocks)  # linear: compact frozen rows
        for constant_frozen in (False, True):
            lin.linear(x, tw, tb, fw_c, fb, table, torch.zeros(6), constant_frozen).sum().backward()
        with lin.count_work(torch.zeros(1, dtype=torch.int64)):  # the work counter compiled in
            lin.linear(x, tw, tb, fw_c, fb, table, None).sum().backward()
        # task-major states (a network's layout): every window a slice, the kernels without their gather paths
        major = make_table(torch.tensor([0, 0, 1, FREE, FREE], dtype=torch.int16),
                           torch.tensor([0, 1, FREE, FREE, PRUNED, FREE], dtype=torch.int16), lo)
        fw_m = compact_rows(torch.randn(6, 5, dtype=dtype), major.frozen_blocks)
        fb_m = torch.randn(2, dtype=dtype) if bias else None
        tw_m = torch.randn(4, 5, dtype=dtype, requires_grad=True)
        tb_m = torch.randn(4, dtype=dtype, requires_grad=True) if bias else None
        for constant_frozen in (False, True):
            lin.linear(x, tw_m, tb_m, fw_m, fb_m, major, torch.zeros(6), constant_frozen).sum().backward()
        # conv2d on the same tables (columns are input channels), compact frozen rows [rows, width, 3, 3]
        twc = torch.randn(3, 5, 3, 3, dtype=dtype, requires_grad=True)
        fwc = compact_rows(torch.randn(6, 5, 3, 3, dtype=dtype), table.frozen_blocks)
        xc = torch.randn(2, 5, 6, 6, dtype=dtype, requires_grad=True)
        for constant_frozen in (False, True):
            conv.conv2d(xc, twc, tb, fwc, fb, table, (1, 1), (1, 1), (1, 1), torch.zeros(6),
                        constant_frozen).sum().backward()
        with lin.count_work(torch.zeros(1, dtype=torch.int64)):  # the work counter compiled in
            conv.conv2d(xc, twc, tb, fwc, fb, table, (2, 1), (1, 0), (1, 2), None).sum().backward()
        twc_m = torch.randn(4, 5, 3, 3, dtype=dtype, requires_grad=True)
        fwc_m = compact_rows(torch.randn(6, 5, 3, 3, dtype=dtype), major.frozen_blocks)
        for constant_frozen in (False, True):
            conv.conv2d(xc, twc_m, tb_m, fwc_m, fb_m, major, (1, 1), (1, 1), (1, 1), torch.zeros(6),
                        constant_frozen).sum().backward()
    if dtype != torch.float32:
        # under autocast the ops get float32 inputs and a table built for float32's tiles, and run in ``dtype``
        # with those tiles (``tiles.table_shape``)
        x32, tw32, fw32 = x.detach().float(), tw.detach().float(), fw_c.float()
        with torch.autocast("cpu", dtype):
            lin.linear(x32.requires_grad_(), tw32.requires_grad_(), None, fw32, None, table, None).sum().backward()
            conv.conv2d(xc.detach().float().requires_grad_(), twc.detach().float().requires_grad_(), None,
                        fwc.float(), None, table, (1, 1), (1, 1), (1, 1), None).sum().backward()
    for training in (True, False):
        for stats in (True, False):
            xb = torch.randn(4, 6, 3, 3, dtype=dtype, requires_grad=True)
            tw = torch.randn(3, dtype=dtype, requires_grad=True)
            tb = torch.randn(3, dtype=dtype, requires_grad=True)
            rm = torch.zeros(6, dtype=torch.float32) if stats else None
            rv = torch.ones(6, dtype=torch.float32) if stats else None
            bn.batch_norm(xb, rm, rv, tw, torch.randn(n_frozen, dtype=dtype), tb, torch.randn(n_frozen, dtype=dtype),
                          task, slot, training, 0.1, 1e-5, torch.zeros(6)).sum().backward()
    xb = torch.randn(4, 6, 3, 3, dtype=dtype, requires_grad=True)
    with lin.count_work(torch.zeros(1, dtype=torch.int64)):  # the work counter compiled in, frozen as constants
        bn.batch_norm(xb, torch.zeros(6), torch.ones(6), tw, torch.randn(n_frozen, dtype=dtype), tb,
                      torch.randn(n_frozen, dtype=dtype), task, slot, True, 0.1, 1e-5, None,
                      constant_frozen=True).sum().backward()
    if dtype == torch.float32:  # rows of 32x32 values, as in a CNN: the specialisation that vectorises loads
        xr = torch.randn(2, 6, 32, 32, dtype=dtype)
        bn.batch_norm(xr.requires_grad_(), torch.zeros(6), torch.ones(6), tw, torch.randn(n_frozen, dtype=dtype), tb,
                      torch.randn(n_frozen, dtype=dtype), task, slot, True, 0.1, 1e-5, None).backward(
                          torch.randn_like(xr))
    x2 = torch.randn(8, 6, dtype=dtype, requires_grad=True)  # [N, C]: channels side by side in a program
    bn.batch_norm(x2, torch.zeros(6), torch.ones(6), tw, torch.randn(n_frozen, dtype=dtype), tb,
                  torch.randn(n_frozen, dtype=dtype), task, slot, True, 0.1, 1e-5, torch.zeros(6)).sum().backward()
