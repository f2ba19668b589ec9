"""Every bad input gives a clear error that names the user's line and says what to do.

Bad inputs tried
----------------
Module tree
  * unknown attribute ``model.h[0].mlpp`` (outside and inside a block)  -> AttributeError, "mlp"
  * nnsight's ``model.session``, ``.edit``, ``.source``, ``envoy.all``, ``.iter``
                                                   -> AttributeError, the jnnsight way
  * index out of range ``model.h[7]`` / ``model.h[-3]``                 -> IndexError
  * an index that is not an int ``model.h["1"]`` / ``model.h[1.0]``      -> TypeError
  * ``model.h = 3`` / ``model.h[0] = 3``                                -> AttributeError / TypeError
  * ``model.h[0].output`` / ``.next()`` outside any block               -> SiteError
  * calling a submodule before any trace ran the model                  -> SiteError
Writes
  * wrong shape, wrong dtype, a Python scalar                           -> WriteError
  * wrong structure: bare array for a tuple output, list for a tuple,
    the whole output tuple into its own element                         -> WriteError
  * tuple element out of range ``model.h[0].output[1] = ...``            -> IndexError
  * ``.input`` of the wrong shape                                       -> WriteError
  * ``.skip(h)`` for a module whose output is a tuple                   -> WriteError, ".skip((h,))"
  * a write of the whole batch's shape inside a one-row invoke          -> WriteError
Sites
  * ``.next()`` past the module's last call                             -> SiteError
  * a module that is defined but never called                           -> SiteError
  * ``.input`` of a module called with keyword arguments only           -> SiteError
Order
  * write to ``h[0].output`` computed from ``h[1].output``              -> CausalityError
Values after the block
  * arithmetic / ``.shape`` / ``.save()`` on an unsaved value           -> UnsavedValueError
  * an unsaved value inside a list; used in the next block              -> UnsavedValueError
  * an unsaved value in ``jax.nn.softmax``, ``jnp.sum``, ``jax.jit``,
    ``jax.tree_util.tree_map``                                          -> UnsavedValueError
  * ``.save()`` on a concrete array inside a block                      -> AttributeError
  * ``.save()`` outside a block on a tracer of the user's ``jax.jit``   -> JnnsightError
  * ``.save(gather=True)`` in a block inside ``jax.jit``                 -> JnnsightError
Capture
  * a block compiled from a string with ``exec``                        -> CaptureError
  * body on the line of the ``with``                                    -> CaptureError
  * a body whose first statement is ``try:``                            -> CaptureError
  * ``return`` inside a block                                           -> CaptureError
  * a trace inside a trace's body / an invoke's body / ``intervene``    -> CaptureError
  * ``tracer.invoke`` in a trace that has its own input                 -> CaptureError
  * ``tracer.invoke`` after the block / inside another invoke           -> CaptureError
  * ``tracer.stop()`` after the block                                   -> CaptureError
  * ``tracer.stop()`` in an invoke before the last                      -> JnnsightError
  * ``tracer.iter`` in a trace                                          -> AttributeError, ".next()"
  * ``h = h.at[...].set(0)`` never written back (JAX's in-place advice)  -> UserWarning
  * ``h += 1`` / ``h *= 0`` on a value read from a site (torch's in-place edit)
                                                                        -> UserWarning
  * ``tracer.invoke(x)`` without ``with``                               -> CaptureError, its line
  * a site read in the body of a trace with no input, outside invokes   -> SiteError, "invoke"
  * a line of a trace's body, after an invoke, that reads what the invoke sets (a
    list it appends to, a loss for ``.backward()``): it ran before the invoke's body
                                                                        -> CaptureError, its line
Inputs
  * invokes whose inputs differ in shape, or in dtype                   -> JnnsightError
  * an invoke input with no batch axis                                  -> JnnsightError
  * only ``tracer.invoke()`` with no input / a trace with neither       -> JnnsightError
  * a model input the forward cannot take                               -> the model's own error
  * flax's errors: variables without their ``{"params": ...}`` level, a
    BatchNorm in training without ``mutable=``, a Dropout without ``rngs=``
                                 -> flax's error, with a note on what to pass
Interventions and training
  * a SteeringVector / LowRankRotation / LinearProbe of another width   -> ValueError, the widths
  * ``train_step`` whose loss is not one number                         -> TypeError, ".mean()"
Exceptions in the body
  * ``1/0``, a jnp shape error, a broadcast error (an error with a cause),
    ``if tracer > 0``, ``np.asarray(tracer)``
                                 -> the original type, the body line last in the traceback
  * ``output[:, -1]``, ``output.shape``, ``output * 2``, ``output + steer`` on a block's tuple output
                                                -> TypeError / AttributeError, "take an element"
  * ``h[:, -1] = 0`` in place, ``h + torch_tensor``, ``[h].save()``,
    ``h.cpu()``, ``h.clone()``, ``h.value``,
    ``if tracer > 0``, ``np.asarray(tracer)``  -> the original error, with a note on the
                                                  jnnsight way to write it
"""

from __future__ import annotations

import os
import re
import traceback
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jnnsight
from jnnsight import NNsight
from jnnsight.errors import (
    CaptureError,
    CausalityError,
    JnnsightError,
    SiteError,
    UnsavedValueError,
    WriteError,
)
from jnnsight.toy import toy_model

THIS = os.path.basename(__file__)

# -- helpers ---------------------------------------------------------------------------

_MARK = re.compile(r"#\s*L:(\w+)\s*$")


def _marks() -> dict[str, int]:
    marks: dict[str, int] = {}
    with open(__file__) as f:
        for n, text in enumerate(f, 1):
            m = _MARK.search(text)
            if m:
                assert m.group(1) not in marks, f"duplicate mark {m.group(1)}"
                marks[m.group(1)] = n
    return marks


MARKS = _marks()


def at(mark: str) -> str:
    """``test_errors.py:N`` for the line carrying ``# L:mark``."""
    return f"{THIS}:{MARKS[mark]}"


def names_line(err: BaseException, mark: str) -> None:
    message = str(err)
    assert at(mark) in message, f"expected {at(mark)} in the message:\n{message}"


def advice(err: BaseException) -> str:
    """The message without its location line (whose quoted source would match anything)."""
    first, _, rest = str(err).partition("\n")
    return rest if f"{THIS}:" in first and rest else str(err)


def frames(err: BaseException) -> list[traceback.FrameSummary]:
    return list(traceback.extract_tb(err.__traceback__))


def user_frames(err: BaseException) -> list[traceback.FrameSummary]:
    return [f for f in frames(err) if os.path.basename(f.filename) == THIS]


def library_frames(err: BaseException) -> list[traceback.FrameSummary]:
    package = os.path.dirname(jnnsight.__file__)
    return [f for f in frames(err) if f.filename.startswith(package)]


# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small():
    return toy_model(layers=2, width=16, heads=2, vocab=32, length=4)


class KwOnly(nn.Module):
    """``d`` is called with keyword arguments only; ``unused`` is never called."""

    def setup(self):
        self.d = nn.Dense(3)
        self.unused = nn.Dense(3)

    def __call__(self, x):
        return self.d(inputs=x)


@pytest.fixture(scope="module")
def kw():
    x = jnp.ones((2, 4))
    return NNsight(KwOnly(), KwOnly().init(jax.random.key(0), x)), x


# -- 1. the module tree -------------------------------------------------------------------


def test_unknown_attribute_suggests_close_name(small):
    model, _ = small
    with pytest.raises(AttributeError) as info:
        model.h[0].mlpp  # L:mlpp
    names_line(info.value, "mlpp")
    assert "'mlp'" in advice(info.value)
    assert "print(model)" in advice(info.value)


def test_unknown_attribute_inside_block(small):
    model, tokens = small
    with pytest.raises(AttributeError) as info:
        with model.trace(tokens):
            y = model.h[0].mlpp.output  # L:mlpp_in
    names_line(info.value, "mlpp_in")
    assert "'mlp'" in advice(info.value)
    assert user_frames(info.value)[-1].lineno == MARKS["mlpp_in"]


def test_index_out_of_range(small):
    model, _ = small
    with pytest.raises(IndexError) as info:
        model.h[7]  # L:h7
    names_line(info.value, "h7")
    assert "2 modules" in advice(info.value)
    with pytest.raises(IndexError) as info:
        model.h[-3]  # L:hm3
    names_line(info.value, "hm3")
    for index in ("1", 1.0, True):
        with pytest.raises(TypeError, match=r"indexed by a Python int or a slice") as info:
            model.h[index]  # L:h_str
        names_line(info.value, "h_str")
    assert model.h[np.int64(1)] is model.h[jnp.asarray(1)] is model.h[1]


def test_assign_to_envoy_attribute(small):
    model, _ = small
    with pytest.raises(AttributeError) as info:
        model.h = 3  # L:assign_h
    names_line(info.value, "assign_h")
    assert ".output" in advice(info.value)


def test_assign_to_envoy_list_item(small):
    model, _ = small
    with pytest.raises(TypeError) as info:
        model.h[0] = 3  # L:assign_h0
    assert user_frames(info.value)[-1].lineno == MARKS["assign_h0"]


def test_site_outside_block(small):
    model, _ = small
    with pytest.raises(SiteError) as info:
        model.h[0].output  # L:out_outside
    names_line(info.value, "out_outside")
    assert ".save()" in advice(info.value)
    with pytest.raises(SiteError) as info:
        model.h[0].next()  # L:next_outside
    names_line(info.value, "next_outside")


def test_call_submodule_before_any_trace():
    x = jnp.ones((2, 4))
    fresh = NNsight(KwOnly(), KwOnly().init(jax.random.key(0), x))
    with pytest.raises(SiteError) as info:
        fresh.d(x)  # L:call_before
    names_line(info.value, "call_before")
    assert "before a trace" in advice(info.value)


# -- 2. writes --------------------------------------------------------------------------


def test_write_wrong_shape(small):
    model, tokens = small
    with pytest.raises(WriteError) as info:
        with model.trace(tokens):
            model.h[0].output[0] = jnp.zeros((1, 4, 8))  # L:shape
    names_line(info.value, "shape")
    message = advice(info.value)
    assert "float32[1, 4, 16]" in message and "float32[1, 4, 8]" in message
    assert "reshape" in message


def test_write_wrong_dtype(small):
    model, tokens = small
    with pytest.raises(WriteError) as info:
        with model.trace(tokens):
            model.h[0].output[0] = jnp.zeros((1, 4, 16), jnp.int32)  # L:dtype
    names_line(info.value, "dtype")
    assert "astype(jnp.float32)" in advice(info.value)


def test_write_python_scalar(small):
    model, tokens = small
    with pytest.raises(WriteError) as info:
        with model.trace(tokens):
            model.h[0].output[0] = 0.0  # L:scalar
    names_line(info.value, "scalar")
    assert ".at[" in advice(info.value)


def test_write_bare_array_to_tuple_output(small):
    model, tokens = small
    with pytest.raises(WriteError) as info:
        with model.trace(tokens):
            model.h[0].output = jnp.zeros((1, 4, 16))  # L:struct
    names_line(info.value, "struct")
    assert "output[0] = v" in advice(info.value)


def test_write_list_to_tuple_output(small):
    model, tokens = small
    with pytest.raises(WriteError) as info:
        with model.trace(tokens):
            model.h[0].output = [model.h[0].output[0]]  # L:struct_list
    names_line(info.value, "struct_list")


def test_write_nested_structure_message_has_no_internal_names(small):
    model, tokens = small
    with pytest.raises(WriteError) as info:
        with model.trace(tokens):
            model.h[0].output[0] = model.h[0].output  # L:struct_nested
    names_line(info.value, "struct_nested")
    # The user wrote a tuple; the library's own SiteTuple should not show up.
    assert "SiteTuple" not in advice(info.value), str(info.value)


def test_write_tuple_element_out_of_range(small):
    model, tokens = small
    with pytest.raises(IndexError) as info:
        with model.trace(tokens):
            model.h[0].output[1] = model.h[0].output[0]  # L:tuple_index
    assert user_frames(info.value)[-1].lineno == MARKS["tuple_index"]
    # like `model.h[7]`, the message should name the line and the tuple's length
    names_line(info.value, "tuple_index")
    assert re.search(r"\b1 (element|item)|length (of )?1\b", advice(info.value)), str(info.value)


def test_write_input_wrong_shape(small):
    model, tokens = small
    with pytest.raises(WriteError) as info:
        with model.trace(tokens):
            model.h[1].input = jnp.zeros((1, 4, 3))  # L:input_shape
    names_line(info.value, "input_shape")
    assert "model.h[1].input" in advice(info.value)


def test_write_whole_batch_shape_in_one_row_invoke(small):
    model, tokens = small
    with pytest.raises(WriteError) as info:
        with model.trace() as tracer:
            with tracer.invoke(tokens):
                model.h[0].output[0] = jnp.zeros((2, 4, 16))  # L:rows
            with tracer.invoke(tokens):
                y = model.output.save()
    names_line(info.value, "rows")
    assert "float32[1, 4, 16]" in advice(info.value)


# -- 3. sites that do not run ----------------------------------------------------------


def test_next_past_last_call(small):
    model, tokens = small
    with pytest.raises(SiteError) as info:
        with model.trace(tokens):
            y = model.h[0].next().output  # L:next
    names_line(info.value, "next")
    message = advice(info.value)
    assert "once" in message and ".next()" in message


def test_module_never_called(kw):
    model, x = kw
    with pytest.raises(SiteError) as info:
        with model.trace(x):
            y = model.unused.output  # L:unused
    names_line(info.value, "unused")
    assert "0 times" in advice(info.value)


def test_input_of_module_called_with_keywords_only(kw):
    model, x = kw
    with pytest.raises(SiteError) as info:
        with model.trace(x):
            a = model.d.input  # L:kw_input
    names_line(info.value, "kw_input")
    assert "`.inputs`" in advice(info.value)


# -- 4. causality -----------------------------------------------------------------------


def test_causality_names_both_lines(small):
    model, tokens = small
    with pytest.raises(CausalityError) as info:
        with model.trace(tokens):
            later = model.h[1].output[0]  # L:caus_read
            model.h[0].output = (later * 2,)  # L:caus_write
    names_line(info.value, "caus_read")
    names_line(info.value, "caus_write")
    message = advice(info.value)
    assert "model.h[0].output" in message and "model.h[1].output" in message
    assert "second trace" in message


def test_causality_traceback_hides_library_frames(small):
    """errors.py: "Library frames are left out of what the user sees"."""
    model, tokens = small
    with pytest.raises(CausalityError) as info:
        with model.trace(tokens):  # L:caus2_with
            later = model.h[1].output[0]
            model.h[0].output = (later * 2,)
    inner = [f for f in library_frames(info.value) if f.name != "__exit__"]
    assert not inner, "library frames in the traceback: " + ", ".join(
        f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in inner
    )


# -- 5. values used after the block ------------------------------------------------------


def test_unsaved_value_arithmetic(small):
    model, tokens = small
    with pytest.raises(UnsavedValueError) as info:
        with model.trace(tokens):  # L:unsaved_with
            hidden = model.h[0].output[0]
        hidden + 1
    message = advice(info.value)
    assert "`hidden`" in message
    assert ".save()" in message
    names_line(info.value, "unsaved_with")


def test_unsaved_value_names_the_line_of_use(small):
    model, tokens = small
    with pytest.raises(UnsavedValueError) as info:
        with model.trace(tokens):
            hidden = model.h[0].output[0]
        hidden.shape  # L:unsaved_use
    assert "`hidden`" in advice(info.value)
    assert user_frames(info.value)[-1].lineno == MARKS["unsaved_use"]
    names_line(info.value, "unsaved_use")


def test_unsaved_value_in_jax_functions(small):
    model, tokens = small
    with model.trace(tokens):
        logits = model.output
    uses = {
        "softmax": lambda: jax.nn.softmax(logits, axis=-1),
        "sum": lambda: jnp.sum(logits),
        "norm": lambda: jnp.linalg.norm(logits),
        "jit": lambda: jax.jit(lambda x: x * 2)(logits),
        "asarray": lambda: jnp.asarray(logits),
        "tree": lambda: jax.tree_util.tree_map(lambda x: x, {"a": logits}),
    }
    for use, call in uses.items():
        with pytest.raises(UnsavedValueError, match="`logits` is a value of a trace block"):
            call()
    # the name can be bound again by the next block
    with model.trace(tokens):
        logits = model.output.save()
    assert logits.shape[:2] == tokens.shape


def test_unsaved_value_save_after_block(small):
    model, tokens = small
    with pytest.raises(UnsavedValueError) as info:
        with model.trace(tokens):
            hidden = model.h[0].output[0]
        hidden.save()
    assert "`hidden`" in advice(info.value)


def test_unsaved_value_in_list(small):
    model, tokens = small
    with pytest.raises(UnsavedValueError) as info:
        with model.trace(tokens):
            hs = [model.h[0].output[0]]
        hs[0] + 1
    assert "`hs[0]`" in advice(info.value)


def test_unsaved_value_used_in_next_block(small):
    model, tokens = small
    with model.trace(tokens):
        hidden = model.h[0].output[0]
    with pytest.raises(UnsavedValueError) as info:
        with model.trace(tokens):
            model.h[1].output[0] = hidden  # L:unsaved_next
    assert "`hidden`" in advice(info.value)
    assert user_frames(info.value)[-1].lineno == MARKS["unsaved_next"]


def test_save_of_concrete_array_in_block(small):
    model, tokens = small
    with pytest.raises(AttributeError) as info:
        with model.trace(tokens):
            t = tokens.save()  # L:concrete_save
    assert user_frames(info.value)[-1].lineno == MARKS["concrete_save"]


def test_save_outside_block_in_user_jit():
    @jax.jit
    def f(x):
        return x.save()  # L:jit_save

    with pytest.raises(JnnsightError) as info:
        f(jnp.ones(3))
    assert "model.trace" in advice(info.value)
    names_line(info.value, "jit_save")


def test_gather_in_a_block_inside_jax_jit(small):
    model, tokens = small

    @jax.jit
    def f(tokens):
        with model.trace(tokens):
            out = model.output.save(gather=True)  # L:jit_gather
        return out

    with pytest.raises(JnnsightError) as info:
        f(tokens)
    assert "return it, and gather the result outside" in advice(info.value)
    names_line(info.value, "jit_gather")


# -- 6. capture --------------------------------------------------------------------------


def test_block_from_exec_string(small):
    model, tokens = small
    src = "with model.trace(tokens):\n    y = model.output.save()\n"
    with pytest.raises(CaptureError) as info:
        exec(compile(src, "<string>", "exec"), {"model": model, "tokens": tokens})
    message = advice(info.value)
    assert "<string>:1" in message
    assert "exec" in message  # why
    assert "model.intervene" in message and "file" in message  # what to do


def test_body_on_the_with_line(small):
    model, tokens = small
    with pytest.raises(CaptureError) as info:
        with model.trace(tokens): y = model.output.save()  # noqa: E701  # L:sameline
    names_line(info.value, "sameline")
    message = advice(info.value)
    assert "line of its `with`" in message, message
    assert "lines of its own" in message


def test_block_beginning_with_try(small):
    model, tokens = small
    with pytest.raises(CaptureError) as info:
        with model.trace(tokens):
            try:  # L:try
                y = model.output.save()
            except KeyError:
                pass
    names_line(info.value, "try")
    assert "Put the `try` around the `with` block" in advice(info.value)
    # a statement before it is a place to stop: the try then runs as written
    with model.trace(tokens):
        y = model.output.save()
        try:
            h = model.h[0].output[0].save()
        except KeyError:
            pass
    assert h.shape[:2] == tokens.shape and y.shape[:2] == tokens.shape


def test_return_inside_block(small):
    model, tokens = small

    def f():
        with model.trace(tokens):
            y = model.output.save()
            return y  # L:return

    with pytest.raises(CaptureError) as info:
        f()
    names_line(info.value, "return")
    assert "after it" in advice(info.value)


# -- 7. exceptions raised in the body ------------------------------------------------------


def _check_body_traceback(err: BaseException, with_mark: str, body_mark: str) -> None:
    fs = frames(err)
    users = user_frames(err)
    assert users[-1].lineno == MARKS[body_mark], [f"{f.name}:{f.lineno}" for f in fs]
    with_i = next(i for i, f in enumerate(fs) if os.path.basename(f.filename) == THIS
                  and f.lineno == MARKS[with_mark])
    body_i = max(i for i, f in enumerate(fs) if os.path.basename(f.filename) == THIS)
    between = fs[with_i + 1 : body_i]
    # only the block's own __exit__ may stand between the `with` line and the body line
    assert all(f.name == "__exit__" for f in between), [f"{f.filename}:{f.name}" for f in between]
    assert len(between) <= 1
    # the exception that stops the body's inline run is not in the chain a traceback prints
    assert "SkipBody" not in "".join(traceback.format_exception(err))


def test_zero_division_in_body(small):
    model, tokens = small
    with pytest.raises(ZeroDivisionError) as info:
        with model.trace(tokens):  # L:div_with
            h = model.h[0].output[0]
            1 / 0  # L:div
    _check_body_traceback(info.value, "div_with", "div")


def test_jnp_shape_error_in_body(small):
    model, tokens = small
    with pytest.raises(TypeError) as info:
        with model.trace(tokens):  # L:mm_with
            h = model.h[0].output[0]
            h @ jnp.ones((3, 3))  # L:mm
    _check_body_traceback(info.value, "mm_with", "mm")
    assert "dot_general" in advice(info.value)


def test_jnp_broadcast_error_in_body(small):
    """JAX raises this one from another error: its whole chain is printed, SkipBody was in it."""
    model, tokens = small
    with pytest.raises(ValueError) as info:
        with model.trace(tokens):  # L:bc_with
            h = model.h[0].output[0]
            h + jnp.ones((3,))  # L:bc
    _check_body_traceback(info.value, "bc_with", "bc")
    assert "Incompatible shapes for broadcasting" in str(info.value)


def test_python_branch_on_traced_value(small):
    model, tokens = small
    with pytest.raises(jax.errors.TracerBoolConversionError) as info:
        with model.trace(tokens):  # L:bool_with
            if model.h[0].output[0].sum() > 0:  # L:bool
                pass
    _check_body_traceback(info.value, "bool_with", "bool")
    assert "jnp.where" in info.value.__notes__[-1]


def test_numpy_conversion_of_traced_value(small):
    model, tokens = small
    with pytest.raises(jax.errors.TracerArrayConversionError) as info:
        with model.trace(tokens):  # L:np_with
            a = np.asarray(model.h[0].output[0])  # L:np
    _check_body_traceback(info.value, "np_with", "np")
    assert "save the value and use numpy after" in info.value.__notes__[-1]


def test_nnsight_api_jnnsight_spells_otherwise_names_the_jnnsight_way(small):
    model, _ = small
    for name, advice in (("session", "one after another"), ("edit", "model.intervene"),
                         ("source", "inputs and outputs only"), ("all", "tracer.all()"),
                         ("iter", "tracer.iter")):
        with pytest.raises(AttributeError, match=rf"`.{name}` is nnsight's; .*{re.escape(advice)}") as info:
            getattr(model.h[0] if name in ("source", "all", "iter") else model, name)
        assert THIS in str(info.value).splitlines()[0]


def test_skip_with_a_bare_array_for_a_tuple_output_says_to_give_the_whole_output(small):
    model, tokens = small
    with pytest.raises(WriteError, match=r"\.skip\(\(h,\)\)") as info:
        with model.trace(tokens):
            model.h[1].skip(model.h[0].output[0])
    assert THIS in str(info.value).splitlines()[0]
    with model.trace(tokens):
        model.h[1].skip((model.h[0].output[0],))
        out = model.h[1].output[0].save()
        before = model.h[0].output[0].save()
    np.testing.assert_array_equal(out, before)


def test_array_habits_on_a_tuple_output_say_to_take_an_element(small):
    """transformers 5 blocks return a tensor; ours (and transformers 4's) a tuple."""
    model, tokens = small
    for use in (lambda o: o[:, -1], lambda o: o[..., 0], lambda o: o.shape, lambda o: o * 2,
                lambda o: 2 * o, lambda o: o.sum(), lambda o: o + jnp.ones(16),
                lambda o: jnp.ones(16) + o, lambda o: o - 1):  # `layer.output + steer`, nnsight 0.8's
        with pytest.raises((TypeError, AttributeError), match="take an element first") as info:
            with model.trace(tokens):
                use(model.h[0].output)
        assert THIS in str(info.value).splitlines()[0]
    with pytest.raises(AttributeError, match=r"e.g. `\.output\[0\]\.grad`"):  # not a slice's
        with model.trace(tokens):
            with model.output.sum().backward():
                model.h[0].output.grad.save()
    with model.trace(tokens):
        first = model.h[0].output[0][:, -1].save()
        whole = jnnsight.save(model.h[0].output[0:1])
    np.testing.assert_array_equal(first, whole[0][:, -1])


def test_torch_and_nnsight_habits_in_a_body_get_a_note_on_the_jnnsight_way(small):
    """The error stays JAX's or Python's; a note says how jnnsight spells it."""
    torch = pytest.importorskip("torch")
    model, tokens = small

    def in_place():
        model.h[0].output[0][:, -1] = 0

    def with_torch():
        return model.h[0].output[0] + torch.ones(1)

    def list_save():
        return [model.h[0].output[0]].save()

    def torch_method():
        return model.h[0].output[0].cpu()

    def clone():
        return model.h[0].output[0].clone()

    def proxy_value():
        return model.h[0].output[0].value

    class Settings:
        pass

    with pytest.raises(AttributeError) as info:  # not a block value: no torch note
        with model.trace(tokens):
            Settings().value
    assert not any("torch" in note for note in getattr(info.value, "__notes__", ()))
    for body, error, note in ((in_place, TypeError, "envoy.output = envoy.output.at"),
                              (with_torch, TypeError, "jnp.asarray(t.detach()"),
                              (list_save, AttributeError, "jnnsight.save(value)"),
                              (torch_method, AttributeError, "not a torch tensor"),
                              (clone, AttributeError, "no clone is needed"),
                              (proxy_value, AttributeError, "not a torch tensor or proxy")):
        with pytest.raises(error) as info:
            with model.trace(tokens):
                body()
        assert note in info.value.__notes__[-1], body.__name__


class Training(nn.Module):
    """A BatchNorm and a Dropout: in training, flax wants ``mutable=`` and ``rngs=``."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.BatchNorm(use_running_average=not train)(nn.Dense(8)(x))
        return nn.Dense(2)(nn.Dropout(0.5, deterministic=not train)(x))


def test_flax_errors_get_a_note_on_what_to_pass():
    x = jax.random.normal(jax.random.key(1), (3, 4))
    variables = Training().init(jax.random.key(0), x)
    cases = ((variables["params"], (x,), {}, "collections at the top"),
             (variables, (x, True), {}, "mutable=['batch_stats']"),
             (variables, (x, True), {"mutable": ["batch_stats"]}, "rngs={'dropout'"))
    for given, args, kwargs, note in cases:
        model = NNsight(Training(), given)
        with pytest.raises(Exception) as info:
            with model.trace(*args, **kwargs):  # L:flax_error
                y = model.output.save()
        assert type(info.value).__module__.startswith("flax"), info.value
        assert note in info.value.__notes__[-1]
        assert MARKS["flax_error"] in [f.lineno for f in user_frames(info.value)]
    # and what the notes say to write works, as module.apply does it
    key = jax.random.key(2)
    model = NNsight(Training(), variables)
    with model.trace(x, True, mutable=["batch_stats"], rngs={"dropout": key}) as tracer:
        y = model.output.save()
    expected, updates = Training().apply(variables, x, True, mutable=["batch_stats"],
                                         rngs={"dropout": key})
    np.testing.assert_allclose(y, expected, rtol=1e-6)
    np.testing.assert_allclose(tracer.updates["batch_stats"]["BatchNorm_0"]["mean"],
                               updates["batch_stats"]["BatchNorm_0"]["mean"], rtol=1e-6)


def test_interventions_of_another_width_name_both_widths(small):
    model, tokens = small  # 16 wide
    steer = jnnsight.SteeringVector.zeros(24)
    rotation = jnnsight.LowRankRotation.random(jax.random.key(0), width=24, rank=2)
    probe = jnnsight.LinearProbe.zeros(24, classes=2)
    for kind in ("steer", "rotation", "probe"):
        with pytest.raises(ValueError) as info:
            with model.trace(tokens):
                h = model.h[0].output[0]
                edited = steer(h) if kind == "steer" else rotation(h, h) if kind == "rotation" else probe(h)  # L:width
        names_line(info.value, "width")
        assert "is 24 wide" in advice(info.value) and "[1, 4, 16]" in advice(info.value)


def test_train_step_refuses_a_loss_that_is_not_one_number(small):
    optax = pytest.importorskip("optax")
    model, tokens = small

    def per_row_loss(steer, params, tokens):
        with model.bind(params).trace(tokens):
            model.h[0].output[0] = steer(model.h[0].output[0])
            logits = model.output.save()
        return logits[:, -1, 0]  # one per row: `.mean()` forgotten

    step = jnnsight.train_step(per_row_loss, optax.sgd(0.1))
    steer = jnnsight.SteeringVector.zeros(16)
    with pytest.raises(TypeError, match=r"'per_row_loss' returned shape \[1\]") as info:
        step(steer, optax.sgd(0.1).init(steer), model.variables, tokens)  # L:train_step
    names_line(info.value, "train_step")
    assert ".mean()" in advice(info.value)


def test_model_cannot_take_the_input(small):
    model, _ = small
    with pytest.raises(IndexError) as info:  # toy's forward reads tokens.shape[1]
        with model.trace(jnp.zeros((4,), jnp.int32)):  # L:bad_input
            y = model.output.save()
    assert MARKS["bad_input"] in [f.lineno for f in user_frames(info.value)]


# -- 8. traces inside traces, and invokes ------------------------------------------------------


def test_trace_inside_trace(small):
    model, tokens = small
    with pytest.raises(CaptureError) as info:
        with model.trace(tokens):
            with model.trace(tokens):  # L:nested
                y = model.output.save()
    names_line(info.value, "nested")
    assert "do not nest" in advice(info.value)


def test_trace_inside_invoke(small):
    model, tokens = small
    with pytest.raises(CaptureError) as info:
        with model.trace() as tracer:
            with tracer.invoke(tokens):
                with model.trace(tokens):  # L:nested_invoke
                    y = 1
    names_line(info.value, "nested_invoke")


def test_trace_inside_intervene_body(small):
    model, tokens = small

    def body():
        with model.trace(tokens):  # L:nested_intervene
            y = 1
        return model.output

    with pytest.raises(CaptureError) as info:
        model.intervene(body)(model.variables, tokens)
    names_line(info.value, "nested_intervene")


def test_invoke_in_trace_with_input(small):
    model, tokens = small
    with pytest.raises(CaptureError) as info:
        with model.trace(tokens) as tracer:
            with tracer.invoke(tokens):  # L:invoke_own
                y = model.output.save()
    names_line(info.value, "invoke_own")
    assert "model.trace()" in advice(info.value)


def test_invoke_after_block(small):
    model, tokens = small
    with model.trace() as tracer:
        with tracer.invoke(tokens):
            y = model.output.save()
    with pytest.raises(CaptureError) as info:
        with tracer.invoke(tokens):  # L:invoke_after
            z = 1
    names_line(info.value, "invoke_after")


def test_invoke_inside_invoke(small):
    model, tokens = small
    with pytest.raises(CaptureError) as info:
        with model.trace() as tracer:
            with tracer.invoke(tokens):
                with tracer.invoke(tokens):  # L:invoke_in_invoke
                    y = 1
    names_line(info.value, "invoke_in_invoke")


def test_stop_after_block(small):
    model, tokens = small
    with model.trace(tokens) as tracer:
        y = model.output.save()
    with pytest.raises(CaptureError) as info:
        tracer.stop()  # L:stop_after
    names_line(info.value, "stop_after")


def test_stop_in_an_invoke_before_the_last(small):
    """The later invokes would never run (their names kept stale values, silently)."""
    model, tokens = small
    with pytest.raises(JnnsightError, match="invoke 1 of 2: the invokes after it would never run") as info:
        with model.trace() as tracer:
            with tracer.invoke(tokens):
                a = model.h[0].output[0].save()
                tracer.stop()  # L:stop_first
            with tracer.invoke(tokens):
                b = model.h[1].output[0].save()
    names_line(info.value, "stop_first")
    with model.trace() as tracer:  # in the last invoke it ends the block
        with tracer.invoke(tokens):
            a = model.h[1].output[0].save()
        with tracer.invoke(tokens):
            b = model.h[0].output[0].save()
            tracer.stop()
    assert a.shape == b.shape == (*tokens.shape, 16)


def test_an_invoke_without_with_names_its_line(small):
    """A bare ``tracer.invoke(x)`` adds no input; the error is at it, not at the next read."""
    model, tokens = small
    with pytest.raises(CaptureError) as info:
        with model.trace() as tracer:
            tracer.invoke(tokens)  # L:bare_invoke
            y = model.output.save()
    names_line(info.value, "bare_invoke")
    assert "with tracer.invoke(x):" in advice(info.value)
    with pytest.raises(CaptureError) as info:  # nothing read after it: the same error
        with model.trace() as tracer:
            with tracer.invoke(tokens):
                y = model.output.save()
            tracer.invoke(tokens)  # L:bare_invoke_last
    names_line(info.value, "bare_invoke_last")


def test_a_line_after_the_invokes_reading_what_they_set_is_refused(small):
    """A trace's body runs first, collecting its invokes; their bodies run after it. A
    line after an invoke reading what the invoke sets saw it as it was before: an empty
    list (silently), an unbound name."""
    model, tokens = small
    with pytest.raises(CaptureError) as info:
        with model.trace() as tracer:
            kept = []
            with tracer.invoke(tokens):
                kept.append(model.h[0].output[0])
            saved = [k.save() for k in kept]  # L:after_append
    names_line(info.value, "after_append")
    assert "reads `kept`" in advice(info.value) and "into the last invoke" in advice(info.value)
    with pytest.raises(CaptureError) as info:
        with model.trace() as tracer:
            with tracer.invoke(tokens):
                loss = model.output[0, -1, 0]
            with loss.backward():  # L:after_loss
                g = model.h[0].output[0].grad.save()
    names_line(info.value, "after_loss")
    with pytest.raises(ZeroDivisionError):  # an error before such a line stays the error
        with model.trace() as tracer:
            kept = []
            with tracer.invoke(tokens):
                kept.append(model.h[0].output[0])
            1 / 0
            saved = [k.save() for k in kept]

    class Holder:
        pass

    holder, prompts = Holder(), [tokens, tokens]
    holder.tokens = tokens
    # what only reads, or runs in the invokes, is as before: a list read by both, a loop
    # of invokes, a value one invoke saves and the next one writes, an attribute an invoke
    # sets on an object the body reads, a name bound anew before it is read, names of a
    # comprehension or a lambda that an invoke binds too
    with model.trace() as tracer:
        with tracer.invoke(tokens):
            holder.h = model.h[0].output[0].save()
            for i in range(2):
                x = i
        with tracer.invoke(holder.tokens):
            pass
        for i in range(2):
            with tracer.invoke(prompts[i]):
                pass
        x = 1
        picked = [x for x in prompts][x]
        pick = lambda x: x  # noqa: E731
        with tracer.invoke(pick(picked)):
            pass
    with model.trace(tokens):
        direct = model.h[0].output[0].save()
    np.testing.assert_allclose(holder.h, direct, rtol=1e-6)
    positions = [0, 2]
    with model.trace() as tracer:
        with tracer.invoke(tokens):
            clean = model.h[0].output[0][:, positions].save()
        for scale in (1.0, 2.0):
            with tracer.invoke(tokens):
                model.h[0].output[0] = model.h[0].output[0].at[:, positions].set(clean * scale)
                out = model.output.save()
    with model.trace(tokens):
        model.h[0].output[0] = model.h[0].output[0].at[:, positions].multiply(2.0)
        by_hand = model.output.save()
    np.testing.assert_allclose(out, by_hand, rtol=1e-5, atol=1e-6)


def test_a_read_outside_the_invokes_of_a_trace_without_input_points_to_invoke(small):
    model, tokens = small
    with pytest.raises(SiteError) as info:
        with model.trace() as tracer:
            with tracer.invoke(tokens):
                pass
            y = model.output.save()  # L:outside_invokes
    names_line(info.value, "outside_invokes")
    assert "inside `with tracer.invoke(x):`" in advice(info.value)


def test_generation_step_loops_in_a_trace_point_to_next(small):
    model, tokens = small
    with pytest.raises(AttributeError, match=r"belongs to generation.*`module.next\(\)`") as info:
        with model.trace(tokens) as tracer:
            for step in tracer.iter[0:2]:  # L:iter_in_trace
                pass
    names_line(info.value, "iter_in_trace")


def test_an_update_never_written_back_warns_at_its_line(small):
    """``h = h.at[...].set(0)`` (the advice of JAX's in-place error) changes nothing in the
    model; the block warns at that line. Used updates do not warn."""
    model, tokens = small
    with model.trace(tokens):
        plain = model.output.save()
    with pytest.warns(UserWarning, match="never written to the model or saved") as record:
        with model.trace(tokens):
            h = model.h[0].output[0]
            h = h.at[:, -1].set(0)  # L:dead_update
            logits = model.output.save()
    assert [w.lineno for w in record if "never written" in str(w.message)] == [MARKS["dead_update"]]
    np.testing.assert_array_equal(logits, plain)  # the model indeed did not see it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with model.trace(tokens):
            model.h[0].output[0] = model.h[0].output[0].at[:, -1].set(0)
            kept = jnnsight.save(model.h[1].output[0].at[:, 0].add(1.0))
            logits = model.output.save()
        with model.trace(tokens):  # carried to the next layer: only the last run is unused
            carried = None
            for block in model.h:
                if carried is not None:
                    block.output[0] = carried
                carried = block.output[0].at[:, -1].set(0)
    assert not np.array_equal(logits, plain)


def test_an_augmented_assignment_never_written_back_warns_at_its_line(small):
    """``h += 1`` edits a torch tensor in place; here it rebinds ``h`` and the model never
    sees it, so the block warns there. An ``op=`` on the envoy itself is a write, and an
    accumulator that is used does not warn."""
    model, tokens = small
    with model.trace(tokens):
        plain = model.output.save()
    with pytest.warns(UserWarning, match="makes a new array and rebinds") as record:
        with model.trace(tokens):
            h = model.h[0].output[0]
            h += 1  # L:aug_add
            m = model.h[1].output[0]
            m *= 0  # L:aug_mul
            logits = model.output.save()
    found = [(w.lineno, str(w.message)) for w in record if "never written" in str(w.message)]
    assert [line for line, _ in found] == [MARKS["aug_add"], MARKS["aug_mul"]]
    assert "`h += ...` makes a new array and rebinds `h`" in found[0][1]
    assert "`envoy.output *= ...`" in found[1][1]
    np.testing.assert_array_equal(logits, plain)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with model.trace(tokens):
            model.h[0].output[0] += 1  # a write of the site
            total = 0
            for block in model.h:
                total += block.output[0].sum()
            total = total.save()
            edited = model.output.save()
    with model.trace(tokens):
        model.h[0].output[0] = model.h[0].output[0] + 1
        by_hand = model.output.save()
        by_hand_total = jnnsight.save(model.h[0].output[0].sum() + model.h[1].output[0].sum())
    np.testing.assert_array_equal(edited, by_hand)
    assert not np.array_equal(edited, plain)
    np.testing.assert_allclose(total, by_hand_total, rtol=1e-6)
    # an `op=` in the user's own module code is the model's business, not the block's
    x = jnp.ones((2, 3))
    model = NNsight(Accumulating(), Accumulating().init(jax.random.key(0), x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with model.trace(x):
            first = model.output[0].save()
    np.testing.assert_allclose(first, Accumulating().apply(model.variables, x)[0], rtol=1e-6)


class Accumulating(nn.Module):
    """Its ``aux += 1.0`` is unused where a block saves only the first output."""

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(2)(x)
        aux = h.sum()
        aux += 1.0
        return h, aux


# -- inputs of a trace -------------------------------------------------------------------------


def test_invokes_with_mismatched_shapes(small):
    model, tokens = small
    with pytest.raises(JnnsightError) as info:
        with model.trace() as tracer:  # L:mismatch_trace
            with tracer.invoke(tokens):  # L:mismatch_1
                y = model.output.save()
            with tracer.invoke(jnp.zeros((1, 3), jnp.int32)):  # L:mismatch_2
                z = model.output.save()
    message = advice(info.value)
    assert "pad" in message
    # the message should say which of the user's invokes disagree
    full = str(info.value)
    assert at("mismatch_2") in full or at("mismatch_1") in full, full
    with pytest.raises(JnnsightError, match=r"give them one dtype \(`x.astype\('int32'\)`\)"):
        with model.trace() as tracer:
            with tracer.invoke(tokens):
                y = model.output.save()
            with tracer.invoke(tokens.astype(jnp.int16)):
                z = model.output.save()


def test_invoke_input_without_batch_axis(small):
    model, tokens = small
    with pytest.raises(JnnsightError) as info:
        with model.trace() as tracer:
            with tracer.invoke(jnp.int32(3)):  # L:nobatch
                y = model.output.save()
    assert "(batch, ...)" in advice(info.value)
    names_line(info.value, "nobatch")


class Unhashable:
    __hash__ = None


def test_an_unhashable_argument_is_named(kw):
    model, x = kw
    for bad, name in ((Unhashable(), "`kwargs['opts']` (Unhashable)"),
                      ({"a": {1, 2}}, "`kwargs['opts']['a']` (set)")):
        with pytest.raises(JnnsightError) as info:
            with model.trace(x, opts=bad):  # L:unhashable
                y = model.output.save()
        assert f"the argument {name} cannot be hashed" in str(info.value)
        names_line(info.value, "unhashable")


def test_trace_with_no_input_and_no_invoke(small):
    model, _ = small
    with pytest.raises(JnnsightError) as info:
        with model.trace() as tracer:  # L:no_input
            y = 1
    names_line(info.value, "no_input")
    assert "give it an input" in advice(info.value)


def test_only_invokes_without_input(small):
    model, _ = small
    with pytest.raises(JnnsightError) as info:
        with model.trace() as tracer:  # L:empty_invoke_trace
            with tracer.invoke():  # L:empty_invoke
                y = model.output.save()
    assert "tracer.invoke(x)" in advice(info.value)
    full = str(info.value)
    assert at("empty_invoke_trace") in full or at("empty_invoke") in full, full
