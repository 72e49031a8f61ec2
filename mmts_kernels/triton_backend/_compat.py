"""A compatibility fix for the Triton *interpreter* (TRITON_INTERPRET=1, CPU tests only) under NumPy ≥ 2.4.

The interpreter of triton ≤ 3.6 turns a runtime scalar into a Python int with ``int(one_element_array)``, which
NumPy 2.4 turned into a TypeError; every ``for _ in range(0, D, BLOCK)`` over a runtime bound then fails
(triton-lang/triton#9171, fixed upstream after 3.6). Until the pinned triton carries the fix, this wraps the
interpreter's tensor patching so ``__index__`` reads the one element explicitly. Compiled kernels (a GPU) never
reach this code; it is applied only when the interpreter is on, and only once.
"""
from __future__ import annotations

_applied = False


def fix_interpreter_index() -> None:
    global _applied
    if _applied:
        return
    _applied = True
    import numpy as np
    from triton import knobs
    from triton.runtime import interpreter

    if not knobs.runtime.interpret or tuple(int(p) for p in np.__version__.split(".")[:2]) < (2, 4):
        return
    original = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patch_lang_tensor


def interpret_triton_stdlib() -> None:
    """Make triton's own jit functions (tl.zeros, tl.sum, tl.max, tl.cdiv, …) interpretable when triton.language
    was imported before TRITON_INTERPRET=1 was set.

    triton.jit decides compiler vs interpreter when a function is defined, and triton's standard library is defined
    when triton.language is first imported — in a test session that can be long before a test sets the variable
    (``import torch._dynamo`` imports triton). Interpreted kernels cannot call compiled-mode jit functions, so
    when the interpreter is on, those are re-wrapped once as interpreted functions. Setting TRITON_INTERPRET=1
    before anything imports triton makes this a no-op; on a GPU it is never called.
    """
    import sys

    from triton import knobs
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    if not knobs.runtime.interpret:
        return
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "triton.language" or name.startswith("triton.language.")):
            continue
        for attr, value in list(vars(module).items()):
            if type(value) is JITFunction:
                setattr(module, attr, InterpretedFunction(value.fn))
