"""In-place products are FLOPs too: torch.utils.flop_counter's registry leaves out `addmm_` and
`baddbmm_` (packets of their own); the planner's trace prices them, and FlopCounterMode counts them
with `in_place_flop_formulas` as custom_mapping."""

import torch
from torch.utils.flop_counter import FlopCounterMode

from jigsaw_ext.plan.trace import flop_formula, in_place_flop_formulas

aten = torch.ops.aten


def test_flop_counter_counts_in_place_products_with_the_mapping():
    a, b, c = torch.randn(8, 16), torch.randn(16, 4), torch.zeros(8, 4)
    x, y, z = torch.randn(3, 8, 16), torch.randn(3, 16, 4), torch.zeros(3, 8, 4)
    with FlopCounterMode(display=False) as plain:
        c.addmm_(a, b)
        z.baddbmm_(x, y)
    with FlopCounterMode(display=False, custom_mapping=in_place_flop_formulas()) as mapped:
        c.addmm_(a, b)
        z.baddbmm_(x, y)
    assert plain.get_total_flops() == 0  # what the registry alone sees
    assert mapped.get_total_flops() == 2 * 8 * 16 * 4 + 2 * 3 * 8 * 16 * 4


def test_trace_formula_for_in_place_forms_and_none_for_other_operators():
    assert flop_formula(aten.addmm_.default) is not None
    assert flop_formula(aten.baddbmm_.default) is not None
    assert flop_formula(aten.mm.out) is not None
    assert flop_formula(aten.add_.Tensor) is None
    assert flop_formula(aten.mul.Tensor) is None
