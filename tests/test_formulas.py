"""rlvrx.formulas.jump, the one jump arithmetic: the formula to the last rounding, and the same bits
as `rlvrx extrapolate weights` on the same checkpoints, at factors where two roundings of
W_a + f (W_b - W_a) disagree (f = 4/3: RL-Extra with m = 3, n = 1)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from clirun import run_cli
from rlvrx.formulas import jump


@pytest.mark.parametrize("factor", [0.25, 4 / 3, 2.0, 5 / 3, 11.0])
def test_jump_is_the_formula_to_the_last_rounding(factor):
    gen = torch.Generator().manual_seed(0)
    anchor, current = torch.randn(4000, generator=gen, dtype=torch.float64), torch.randn(4000, generator=gen, dtype=torch.float64)
    exact = anchor + factor * (current - anchor)
    got = jump(anchor, current, factor)
    assert got.dtype == torch.float64
    # |error| <= a few ulps of the largest operand (lerp's two forms round differently, neither exactly)
    scale = torch.maximum(torch.maximum(anchor.abs(), current.abs()), exact.abs()) * abs(factor)
    assert ((got - exact).abs() <= 4 * torch.finfo(torch.float64).eps * (scale + 1)).all()
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        a, c = anchor.to(dtype), current.to(dtype)
        assert torch.equal(jump(a, c, factor), torch.lerp(a.float(), c.float(), factor).to(dtype))


def test_rl_extra_and_verl_jumps_equal_extrapolate_weights_bit_for_bit(tmp_path, tiny_model_dir, write_safetensors_checkpoint):
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    gen = torch.Generator().manual_seed(1)
    a = {k: v.to(torch.bfloat16) for k, v in base.items()}
    b = {k: (v + 1e-2 * torch.randn(v.shape, generator=gen)).to(torch.bfloat16) for k, v in base.items()}
    dir_a = write_safetensors_checkpoint(tmp_path / "a", a, source_dir=tiny_model_dir)
    dir_b = write_safetensors_checkpoint(tmp_path / "b", b, source_dir=tiny_model_dir)
    factor = 4 / 3
    code, _, err = run_cli("extrapolate", "weights", "--base-path", dir_a, "--second-path", dir_b, "--alpha", repr(factor), "--out", tmp_path / "x")
    assert code == 0, err
    out = load_file(str(tmp_path / "x" / "model.safetensors"))
    jumped = [name for name in a if "norm" not in name]
    assert jumped and all(torch.equal(out[name], jump(a[name], b[name], factor)) for name in jumped)
    # the other rounding, a + f (b - a) in float32, differs somewhere: the test tells the two apart
    other = {name: (a[name].float() + factor * (b[name].float() - a[name].float())).to(torch.bfloat16) for name in jumped}
    assert any(not torch.equal(out[name], other[name]) for name in jumped)
