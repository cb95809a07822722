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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_jump_into_out_is_the_same_bits(dtype):
    """The streaming form (out=, the torch path of `rlvrx extrapolate weights`): torch.lerp straight
    into the output where the dtypes allow, else through `compute`; the same bits as the plain call."""
    gen = torch.Generator().manual_seed(2)
    anchor, current = torch.randn(1031, generator=gen).to(dtype), torch.randn(1031, generator=gen).to(dtype)
    for factor in (4 / 3, 0.3, -0.5, 2.0):
        out = torch.empty_like(current)
        assert torch.equal(jump(anchor, current, factor, out=out), jump(anchor, current, factor))
        wide = torch.empty(1031, dtype=torch.float64)
        jump(anchor, current, factor, compute=torch.float64, out=wide)
        assert torch.equal(wide, torch.lerp(anchor.double(), current.double(), factor))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compiled_kernel_is_jump_bit_for_bit(dtype):
    """The kernel is an accelerator of jump for bf16/fp32, not a second arithmetic."""
    import numpy as np

    import rlvrx.kernels as kernels

    if not kernels.available():
        pytest.skip("compiled kernels not built")
    gen = torch.Generator().manual_seed(3)
    anchor, current = torch.randn(4099, generator=gen).to(dtype), torch.randn(4099, generator=gen).to(dtype)
    storage, signed = (np.uint16, torch.int16) if dtype == torch.bfloat16 else (np.uint32, torch.int32)
    bits = lambda t: t.view(signed).numpy().view(storage)  # noqa: E731
    kind = kernels.RAW_KINDS["BF16" if dtype == torch.bfloat16 else "F32"]
    for factor in (4 / 3, 0.3, 0.5, -0.5, 3.0):
        out = np.empty(4099, dtype=storage)
        assert kernels.library().rlvrx_lerp(kind, bits(anchor).ctypes.data, bits(current).ctypes.data, factor, out.ctypes.data, 4099) == 0
        np.testing.assert_array_equal(out, bits(jump(anchor, current, factor)), err_msg=f"factor {factor}")
