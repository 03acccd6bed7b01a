"""The test suite's speed-ups of Triton's interpreter (tests/interpreter_patching.py): installed under the
interpreter, a kernel's nested ``@triton.jit`` helper calls skip the language re-patch, integer operations skip
the overflow checks whose asserts the interpreter drops, and results stay exact."""

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from cortexflow.kernels.runtime import interpreting  # noqa: E402

needs_interpreter = pytest.mark.skipif(not interpreting(), reason="Triton's interpreter runs only without a GPU "
                                                                    "(TRITON_INTERPRET=1); this machine has one")


@triton.jit
def _scaled(x, factor):
    return x * factor


@triton.jit
def _twice_plus_one_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(out_ptr + offs, _scaled(x, 2.0) + 1.0, mask=offs < n)


@needs_interpreter
def test_nested_helpers_skip_the_language_patch(monkeypatch):
    """Each launch patches the language once (a scope with changes, restored after); the helper's call inside each
    of the 4 programs gets an empty scope; the output is exact."""
    from triton.runtime import interpreter

    installed = interpreter._patch_lang
    assert getattr(installed, "skips_nested", False), "conftest did not install tests/interpreter_patching.py"
    scopes = []

    def spy(fn):
        scope = installed(fn)
        scopes.append((fn.__name__, len(scope._changes)))
        return scope

    monkeypatch.setattr(interpreter, "_patch_lang", spy)
    x = torch.randn(50, generator=torch.Generator().manual_seed(0))
    out = torch.empty_like(x)
    _twice_plus_one_kernel[(4,)](x, out, 50, BLOCK=16)
    assert torch.equal(out, x * 2.0 + 1.0)
    launch = [changes for name, changes in scopes if name == "_twice_plus_one_kernel"]
    nested = [changes for name, changes in scopes if name == "_scaled"]
    assert len(launch) == 1 and launch[0] > 0
    assert len(nested) == 4 and set(nested) == {0}


@triton.jit
def _affine_int_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(out_ptr + offs, x * 3 - offs + 7, mask=offs < n)


@needs_interpreter
def test_integer_ops_skip_the_overflow_check_that_debug_off_drops():
    """The interpreter runs with ``debug`` off, so the int64 overflow checks of ``sanitize_overflow`` end in a
    dropped ``device_assert``: conftest switches them off, and integer arithmetic stays exact."""
    from triton.runtime import interpreter

    options = interpreter.interpreter_builder.options
    assert not options.debug and not options.sanitize_overflow, "conftest did not switch the overflow checks off"
    x = torch.randint(-2**20, 2**20, (50,), dtype=torch.int32, generator=torch.Generator().manual_seed(1))
    out = torch.empty_like(x)
    _affine_int_kernel[(4,)](x, out, 50, BLOCK=16)
    assert torch.equal(out, x * 3 - torch.arange(50, dtype=torch.int32) + 7)
