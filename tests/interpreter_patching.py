"""Test-suite speed: two kinds of work of Triton's interpreter that change nothing, skipped.

Triton's interpreter re-patches ``triton.language`` at every nested ``@triton.jit`` call. Under
``TRITON_INTERPRET=1`` a kernel launch patches ``triton.language`` (its builtins become interpreter
functions) for the whole grid and restores it afterwards; each call of a ``@triton.jit`` helper inside the kernel
then patches again, once per program, walking every member of ``tl``, ``tl.core``, ``tl.math`` and ``tl.tensor``
(``inspect.getmembers``). That second walk changes nothing: the builtins are already replaced, so it skips them,
and the other attributes it sets are equivalent to the launch's, which the launch's restore puts back anyway.
It was 40 % of an interpreted FP8 token decoder's time (25.7 of 64.8 s, cProfile). :func:`install` makes a nested
call skip it when the language modules it sees are patched already, and leaves Triton alone where its interpreter does not look
as expected (another version): the suite is then only slower.

:func:`skip_unreported_overflow_checks` removes a second piece of work whose result nobody sees: with the
interpreter's default options (``sanitize_overflow=True``, ``debug=False``) every integer ``+``, ``-`` and ``*``
in a kernel is recomputed in int64 and compared with the type's range, and the comparison goes to
``device_assert``, which drops it because ``debug`` is off. A kernel's address arithmetic is integer arithmetic,
so this was the largest single cost of the interpreted token decoders and prefixes (cProfile).
"""

from __future__ import annotations

import dataclasses
import inspect


def install() -> bool:
    """Wrap the interpreter's language patch so a call made while ``triton.language`` is patched does nothing.
    Returns whether the wrapper was installed."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return False
    patch = getattr(interpreter, "_patch_lang", None)
    scope_type = getattr(interpreter, "_LangPatchScope", None)
    is_builtin = getattr(tl.core, "is_builtin", None)
    if patch is None or scope_type is None or is_builtin is None or getattr(patch, "skips_nested", False):
        return False
    if not is_builtin(tl.load):  # the language must be unpatched now, or the check below means nothing
        return False

    def patch_unless_patched(fn):
        # The language modules the function sees (tl, tl.core, as the interpreter's own patch picks them); a
        # launch in progress has patched those whose builtins are interpreter functions already.
        langs = [v for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)]
        if langs and not any(is_builtin(lang.load) for lang in langs):
            return scope_type()
        return patch(fn)

    patch_unless_patched.skips_nested = True
    interpreter._patch_lang = patch_unless_patched
    return True


def skip_unreported_overflow_checks() -> bool:
    """Switch the interpreter's ``sanitize_overflow`` off while its ``debug`` is off (the checks' asserts are
    dropped then: results and errors stay the same). Returns whether the options were changed."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    builder = getattr(interpreter, "interpreter_builder", None)
    options = getattr(builder, "options", None)
    if not dataclasses.is_dataclass(options) or getattr(options, "debug", True) or not getattr(
            options, "sanitize_overflow", False):
        return False
    builder.options = dataclasses.replace(options, sanitize_overflow=False)
    return True
