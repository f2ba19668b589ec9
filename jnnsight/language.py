"""LanguageModel: a Hugging Face checkpoint as a traceable linen model, with its tokenizer.

Each invoke's input is text (a string or a list of strings), token ids (a list,
a list of lists, an array), or a tokenizer output (a dict with ``input_ids``
and optionally ``attention_mask``). All rows of all invokes are left-padded to
the longest, with an attention mask; the models derive position ids from the
mask, so a padded row gives the same numbers as that prompt alone. Shapes are
exact by default (a 10-token prompt shows 10 positions); ``pad_to_multiple_of``
rounds lengths up so a loop over varied prompts compiles a few programs only.

Example::

    >>> from jnnsight import LanguageModel
    >>> lm = LanguageModel("HuggingFaceTB/SmolLM2-135M-Instruct")
    >>> with lm.trace("The Eiffel Tower is in the city of"):
    ...     hidden = lm.model.layers[-1].output[0].save()
    ...     logits = lm.lm_head.output.save()
    >>> lm.tokenizer.decode(logits[0, -1].argmax())
    ' Paris'
"""

from __future__ import annotations

import functools
import inspect
import secrets
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import core
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .errors import JnnsightError, UserLine, at_line, at_user_line, close_names, warn_at_user_line
from .nnsight import NNsight
from .tracing.collate import Batch
from .tracing.discover import is_int
from .sharding import DEFAULT_RULES, LOGICAL_AXES, Rules, automatic, param_shardings, place, shard_inputs
from .tracing.lru import LruCache
from .tracing.program import Rows

if TYPE_CHECKING:
    from .generation import GenerateTracer, GeneratorEnvoy


# nnsight's trace options, and what a jnnsight user does instead
_NNSIGHT_TRACE_OPTIONS = {
    "remote": "there is no NDIF backend; run on a mesh of your own devices "
              "(`LanguageModel(..., mesh=jax.make_mesh(...))`).",
    "scan": "to get shapes without running, use `with lm.scan(x):`.",
    "validate": "every block is checked before it runs (shapes, dtypes, causality).",
    "backend": "blocks compile with JAX; there is no other backend.",
    # transformers' forward options
    "output_hidden_states": "save each layer's output in the block instead: "
                            "`hidden = [layer.output[0].save() for layer in lm.model.layers]` "
                            "(or `tracer.cache()` for every module).",
    "output_attentions": "the attention probabilities are computed inside the attention "
                         "module, not returned by it; read its output or inputs "
                         "(`lm.model.layers[i].self_attn.output`; GPT-2's `attn`).",
    "use_cache": "a trace runs one forward with no KV cache; `lm.generate` keeps its own.",
    "return_dict": "the output is already a dataclass with `.logits`.",
    "past_key_values": "a trace runs one forward with no KV cache; `lm.generate` keeps its own.",
    "labels": "compute the loss from the logits in the block: "
              "`-jax.nn.log_softmax(lm.output.logits)[0, -1, target]`.",
    "trace": "a block always runs its forward when it ends; for the output alone, "
             "`with lm.trace(x): out = lm.output.save()`.",
}


def _rows_of_arrays(value: Any) -> list[np.ndarray]:
    """A tokenizer output's ``input_ids`` or ``attention_mask`` as rows: an array (2-D,
    or 1-D for one row), or a list of rows of their own lengths (no ``padding=True``)."""
    if isinstance(value, (list, tuple)) and value and all(np.ndim(r) == 1 for r in value):
        return [np.asarray(r.tolist() if hasattr(r, "tolist") else r) for r in value]
    return list(np.atleast_2d(np.asarray(value.tolist() if hasattr(value, "tolist") else value)))


def _rows_of_input(value: Any, tokenizer: Any, line: UserLine | None) -> tuple[list[list[int]], list[list[int]]]:
    """One invoke's input as token-id rows and their attention masks."""
    if isinstance(value, str):
        value = [value]
    if isinstance(value, dict) or hasattr(value, "keys"):
        _check_keys(value, line)
        rows = _rows_of_arrays(value["input_ids"])
        masks = value.get("attention_mask")
        masks = [np.ones_like(r) for r in rows] if masks is None else _rows_of_arrays(masks)
        for m in masks:
            _check_mask_values(m, line)
        if [len(m) for m in masks] != [len(r) for r in rows]:
            raise JnnsightError(at_line(line,
                f"the attention mask's rows (lengths {[len(m) for m in masks]}) do not match the "
                f"ids' rows (lengths {[len(r) for r in rows]}): give one mask row per row of ids, "
                "as the tokenizer returns them."))
        if any(len(r) == 0 for r in rows):
            raise JnnsightError(at_line(line, "an invoke's input has no tokens (an empty row)."))
        bad = next((r.dtype for r in rows if not np.issubdtype(r.dtype, np.integer)), None)
        if bad is not None:
            raise JnnsightError(at_line(line, f"token ids must be integers; got {bad} input_ids."))
        return [list(map(int, r)) for r in rows], [list(map(int, m)) for m in masks]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        if tokenizer is None:
            raise JnnsightError(at_line(line, "text was given, and this model has no tokenizer: pass token ids."))
        rows = [list(tokenizer(text)["input_ids"]) for text in value]
        if not all(rows):
            raise JnnsightError(at_line(line,
                f"the text {value[[bool(r) for r in rows].index(False)]!r} has no tokens: a "
                "model needs at least one token to run on."
            ))
        return rows, [[1] * len(r) for r in rows]
    if getattr(value, "ndim", 2) > 2:
        raise JnnsightError(at_line(line,
            f"token ids are [length] or [rows, length]; got an array of shape {list(value.shape)}."))
    ids = value.tolist() if hasattr(value, "tolist") else value
    if isinstance(ids, (list, tuple)):  # rows given as arrays of their own lengths
        ids = [r.tolist() if hasattr(r, "tolist") else r for r in ids]
    if is_int(ids) or (isinstance(ids, list) and ids and not isinstance(ids[0], list)):
        ids = [ids] if isinstance(ids, list) else [[ids]]
    if not isinstance(ids, list) or not ids or not all(isinstance(r, list) and r for r in ids):
        empty = isinstance(ids, list) and (not ids or any(r == [] for r in ids))
        raise JnnsightError(at_line(line,
            "an invoke's input has no tokens (an empty list or row)." if empty else
            f"an invoke's input must be text, token ids or a tokenizer output; got {type(value).__name__}."
        ))
    bad = next((t for r in ids for t in r if not is_int(t)), None)
    if isinstance(bad, core.Tracer):
        raise JnnsightError(at_line(line,
            "token ids given as Python lists inside a jax.jit are a tracer per id: pass one "
            "int array, [rows, length] (a dict with input_ids and attention_mask for rows "
            "of different lengths, left-padded)."))
    if bad is not None:
        raise JnnsightError(at_line(line,
            f"token ids must be integers; got {bad!r} ({type(bad).__name__})."
        ))
    return ids, [[1] * len(r) for r in ids]


def _onto(value: Any, mesh: Mesh) -> Any:
    """``value`` on ``mesh``: a concrete array placed elsewhere (on the user's own mesh,
    whose axes ``jax.make_mesh`` makes explicit, or on one device) moved there, with its
    partition spec where ``mesh`` has the spec's axes, else replicated. An array never
    placed (uncommitted) stays: JAX moves it where a program needs it, without a copy
    that outlives the call."""
    if isinstance(value, core.Tracer) or not isinstance(value, jax.Array) \
            or not value.is_fully_addressable or not value.committed:
        return value
    sharding = value.sharding
    if isinstance(sharding, NamedSharding) and sharding.mesh == mesh:
        return value
    spec = sharding.spec if isinstance(sharding, NamedSharding) else PartitionSpec()
    names = {n for part in spec if part is not None for n in ((part,) if isinstance(part, str) else part)}
    if not names <= set(mesh.axis_names):
        spec = PartitionSpec()
    return jax.device_put(value, NamedSharding(mesh, spec))


def _on_host(value: Any) -> bool:
    """Whether this process can read ``value``: not a tracer, not spread over other hosts."""
    return not isinstance(value, core.Tracer) and not (
        isinstance(value, jax.Array) and not value.is_fully_addressable)


def _checked_mesh(mesh: Any, rules: Any) -> Mesh:
    """``mesh`` and ``rules`` as ``LanguageModel`` takes them, or a clear error."""
    if not isinstance(mesh, Mesh):
        raise TypeError(at_user_line(
            f"mesh= takes a jax.sharding.Mesh, got {mesh!r}: make one with "
            "`jax.make_mesh((2, 4), ('data', 'model'))`."
        ))

    def mesh_axes(axes: Any) -> bool:  # a name, names, or None
        return axes is None or isinstance(axes, str) or (
            isinstance(axes, (tuple, list)) and all(isinstance(a, str) for a in axes))

    if isinstance(rules, (str, bytes)) or not all(
            isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)
            and mesh_axes(rule[1]) for rule in rules):
        raise TypeError(at_user_line(
            "rules= takes (logical axis, mesh axis or axes or None) pairs, such as "
            f"jnnsight.sharding.DEFAULT_RULES; got {rules!r}."
        ))
    names = [name for name, _ in rules]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ValueError(at_user_line(
            f"rules= names the logical axis {twice[0]!r} more than once: each logical axis "
            "takes one rule (jnnsight does not fall back to a later one). For several mesh "
            "axes give one rule a tuple, e.g. ('batch', ('data', 'model'))."
        ))
    used = {a for _, axes in rules for a in ((axes,) if isinstance(axes, str) else axes or ())}
    if rules is not DEFAULT_RULES:  # a typo would leave the dimension replicated, quietly
        logical = sorted({name for name, _ in rules} - LOGICAL_AXES)
        absent = sorted(used - set(mesh.axis_names))
        if logical or absent:
            warn_at_user_line(
                "rules= names "
                + (f"logical axes no model family has: {logical} (they are "
                   f"{sorted(LOGICAL_AXES)})" if logical else "")
                + ("; and " if logical and absent else "")
                + (f"mesh axes this mesh lacks: {absent} (it has {list(mesh.axis_names)})"
                   if absent else "")
                + ". Those rules shard nothing."
            )
    if not used & set(mesh.axis_names):
        warn_at_user_line(
            f"no sharding rule names an axis of this mesh {tuple(mesh.axis_names)} (the rules "
            f"use {sorted(used)}): every parameter is replicated on every device. Name the "
            "mesh's axes 'data' and 'model', or pass rules= for yours."
        )
    return mesh


# Options a checkpoint's generation_config.json may set that lm.generate does not take from it.
_DECODING_OPTIONS = frozenset({
    "do_sample", "temperature", "top_k", "top_p", "min_p", "typical_p", "repetition_penalty",
    "no_repeat_ngram_size", "num_beams", "length_penalty",
})


def _check_keys(value: Any, line: UserLine | None) -> None:
    """A tokenizer output holds ``input_ids`` and, optionally, ``attention_mask``: a
    model input beyond those (``position_ids``, ``token_type_ids``) would be dropped."""
    if "input_ids" not in value:
        raise JnnsightError(at_line(line,
            f"a tokenizer output needs input_ids; this one has {sorted(value.keys())}."))
    extra = sorted(set(value.keys()) - {"input_ids", "attention_mask"})
    if extra:
        raise JnnsightError(at_line(line,
            f"a tokenizer output's {extra[0]!r} is not an input jnnsight gives the model: it "
            "takes input_ids and attention_mask (positions follow from the mask). Pass those "
            "two: `{k: enc[k] for k in ('input_ids', 'attention_mask')}`."))


def _check_mask_values(mask: Any, line: UserLine | None) -> None:
    """An attention mask holds 1 at a token and 0 at padding, nothing else."""
    values = np.asarray(mask)
    bad = values[(values != 0) & (values != 1)]
    if bad.size:
        raise JnnsightError(at_line(line,
            f"an attention mask holds 1 (a token) or 0 (padding); this one holds {bad.flat[0].item()!r}."))


def _invoke_arrays(value: Any, tokenizer: Any, line: UserLine | None, pad: int) -> tuple[Any, Any]:
    """One invoke's input as ``(ids, mask)`` ``[rows, length]``, its rows left-padded.

    JAX arrays (token ids, or a dict of them) stay JAX arrays, so an invoke's input
    may be a tracer of a user's ``jax.jit``; everything else becomes numpy.
    """
    if isinstance(value, dict) and isinstance(value.get("input_ids"), (jax.Array, core.Tracer)):
        _check_keys(value, line)
    ids = value.get("input_ids") if isinstance(value, dict) else value
    if isinstance(ids, (jax.Array, core.Tracer)):
        if not jnp.issubdtype(ids.dtype, jnp.integer) or ids.ndim not in (1, 2):
            raise JnnsightError(at_line(line,
                f"token ids must be integers of shape [length] or [rows, length]; got "
                f"{ids.dtype}{list(ids.shape)}."
            ))
        if ids.size == 0:
            raise JnnsightError(at_line(line,
                f"an invoke's input has no tokens (ids of shape {list(ids.shape)})."))
        mask = value.get("attention_mask") if isinstance(value, dict) else None
        mask = jnp.ones_like(ids) if mask is None else jnp.asarray(mask)
        if mask.shape != ids.shape:
            raise JnnsightError(at_line(line,
                f"the attention mask's shape {list(mask.shape)} is not the ids' shape "
                f"{list(ids.shape)}: give one mask entry per token."))
        if _on_host(mask):
            _check_mask_values(mask, line)
        return (ids[None], mask[None]) if ids.ndim == 1 else (ids, mask)
    rows, masks = _rows_of_input(value, tokenizer, line)
    width = max(len(r) for r in rows)
    padded = np.full((len(rows), width), pad, np.int64)  # int32 once checked against the vocabulary
    mask = np.zeros((len(rows), width), np.int32)
    for i, (r, m) in enumerate(zip(rows, masks)):
        padded[i, width - len(r):] = r
        mask[i, width - len(m):] = m
    return padded, mask


class Tokenizer:
    """A transformers tokenizer that also decodes JAX arrays (``decode(logits.argmax())``).

    Everything else is the wrapped tokenizer's own.
    """

    def __init__(self, tokenizer: Any):
        object.__setattr__(self, "_tokenizer", tokenizer)

    def decode(self, ids: Any, **kwargs: Any) -> str:
        return self._tokenizer.decode(np.asarray(ids).tolist(), **kwargs)

    def batch_decode(self, ids: Any, **kwargs: Any) -> list[str]:
        return self._tokenizer.batch_decode(np.asarray(ids).tolist(), **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._tokenizer(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name == "_tokenizer":  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self._tokenizer, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._tokenizer, name, value)

    def __repr__(self) -> str:
        return repr(self._tokenizer)


# from_pretrained options of transformers and nnsight, and the jnnsight way
_LOADING_OPTIONS = {
    "torch_dtype": "write `dtype=` (jnp.bfloat16, \"bfloat16\" and torch.bfloat16 all work).",
    "device_map": "the model is on JAX's default device (jax.devices()[0]); to spread it "
                  "over devices pass `mesh=jax.make_mesh(...)` (README, Sharding).",
    "dispatch": "the weights are loaded when the model is built; there is nothing to dispatch.",
    "attn_implementation": "the Flax families have one attention, which XLA compiles for "
                           "the device.",
    "trust_remote_code": "jnnsight runs its own Flax GPT-2 and Llama families, never code "
                         "from a repository.",
    "low_cpu_mem_usage": "safetensors are memory-mapped and loaded tensor by tensor already.",
    "quantization_config": "weights are dequantized to `dtype=` when loaded (GGUF "
                           "included); there is no quantized compute.",
    "load_in_8bit": "weights are dequantized to `dtype=` when loaded; there is no 8-bit compute.",
    "load_in_4bit": "weights are dequantized to `dtype=` when loaded; there is no 4-bit compute.",
}


def _refuse_loading_options(unknown: dict[str, Any]) -> None:
    name = next(iter(unknown))
    advice = _LOADING_OPTIONS.get(name)
    if advice is None:
        keywords = inspect.signature(LanguageModel.__init__).parameters
        advice = close_names(name, [k for k, p in keywords.items() if p.kind is p.KEYWORD_ONLY])
    raise TypeError(at_user_line(f"LanguageModel takes no `{name}=`: {advice}"))


class LanguageModel(NNsight):
    """A causal language model from a hub id, a local folder or a ``.gguf`` file.

    Args:
      name_or_path: a Hugging Face hub id (read from the local cache, or
        downloaded where online), a folder with ``config.json`` and
        safetensors (or with one ``.gguf`` file), or a ``.gguf`` file.
      gguf_file: the ``.gguf`` file to load from a folder or hub repository
        that holds several, as in transformers.
      dtype: the parameters' and activations' dtype (``jnp.float32`` or
        ``jnp.bfloat16``).
      pad_to_multiple_of: round padded lengths up to a multiple of this, so
        prompts of varied lengths share a few compiled programs (the padded
        positions are then visible in the shapes).
      module, variables, tokenizer: an already-built model instead of a
        checkpoint (random weights in tests, say).
      mesh, rules: place the parameters on a ``jax.sharding.Mesh`` by the
        family's logical axes and ``rules`` (:mod:`jnnsight.sharding`; by
        default heads, MLP and vocabulary on ``"model"``, the batch on
        ``"data"``). Checkpoints in safetensors load straight into their shards.

    Example::

        >>> lm = LanguageModel("path/to/SmolLM2-135M-Instruct.Q4_1.gguf")
        >>> with lm.trace() as tracer:
        ...     with tracer.invoke("Madison square garden is located in the city of New"):
        ...         embeddings = lm.model.embed_tokens.output
        ...     with tracer.invoke("_ _ _ _ _ _ _ _ _ _"):
        ...         lm.model.embed_tokens.output = embeddings
    """

    def __init__(
        self,
        name_or_path: str | Path | None = None,
        *,
        dtype: Any = jnp.float32,
        pad_to_multiple_of: int | None = None,
        module: nn.Module | None = None,
        variables: Any = None,
        tokenizer: Any = None,
        revision: str | None = None,
        gguf_file: str | None = None,
        mesh: Mesh | None = None,
        rules: Rules = DEFAULT_RULES,
        **unknown: Any,
    ):
        if unknown:
            _refuse_loading_options(unknown)
        if mesh is not None:
            mesh = automatic(_checked_mesh(mesh, rules))
        if pad_to_multiple_of is not None and (
                not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1):
            raise ValueError(at_user_line(
                f"pad_to_multiple_of must be a positive int (or None for exact lengths), got "
                f"{pad_to_multiple_of!r}."
            ))
        if isinstance(tokenizer, (str, Path)):
            raise TypeError(at_user_line(
                f"tokenizer= takes a tokenizer object, got the path {str(tokenizer)!r}: load it "
                "with `transformers.AutoTokenizer.from_pretrained(path)`."
            ))
        generation_config: dict[str, Any] = {}
        if name_or_path is not None:
            if module is not None or variables is not None:
                raise TypeError(at_user_line(
                    "LanguageModel takes a checkpoint (name or path) or module= and "
                    "variables=, not both: the checkpoint would replace them."
                ))
            from .loading.pretrained import load_pretrained

            module, variables, loaded_tokenizer, generation_config = load_pretrained(
                str(name_or_path), dtype, revision, mesh, rules, with_tokenizer=tokenizer is None,
                gguf_file=gguf_file)
            tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
        elif module is None or variables is None:
            raise TypeError("LanguageModel needs a checkpoint (name or path), or module= and variables=.")
        elif not (isinstance(variables, Mapping) and "params" in variables):
            raise TypeError(at_user_line(
                "variables= holds flax collections, the parameters under 'params': pass "
                "{'params': params} (what module.init returns), got "
                f"{type(variables).__name__}"
                + (f" with keys {sorted(variables)[:4]}." if isinstance(variables, Mapping) else ".")
            ))
        elif mesh is not None:
            from .modeling import param_axes_of

            variables = place(variables, param_shardings(param_axes_of(module), variables, mesh, rules))
        super().__init__(module, variables)
        object.__setattr__(self, "mesh", mesh)
        object.__setattr__(self, "rules", rules)
        # arrays moved onto the mesh, by id of the original: (weak reference, copy)
        object.__setattr__(self, "_moved", {})
        if tokenizer is not None:
            tokenizer = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)
            if getattr(tokenizer, "padding_side", "left") != "left":
                # as nnsight sets it: a batch the user tokenizes with `lm.tokenizer(...,
                # padding=True)` then ends every row at the last position
                tokenizer.padding_side = "left"
            if getattr(tokenizer, "pad_token", "") is None and getattr(tokenizer, "eos_token", None):
                tokenizer.pad_token = tokenizer.eos_token  # as nnsight sets it (GPT-2 has none)
        object.__setattr__(self, "tokenizer", tokenizer)
        object.__setattr__(self, "pad_to_multiple_of", pad_to_multiple_of)
        self.generation_config = generation_config
        # generation's schedules and compiled steps, by program and shapes
        object.__setattr__(self, "_generation_programs", LruCache(256))
        object.__setattr__(self, "_warned_generation_config", False)

    @property
    def generation_config(self) -> dict[str, Any]:
        """``lm.generate``'s default end and pad tokens, as transformers would take them.

        ``{"eos_token_id": ..., "pad_token_id": ...}`` (and the rest of the
        checkpoint folder's ``generation_config.json``): see
        :func:`jnnsight.loading.pretrained.load_generation_config`. Empty for GGUF
        files and built models: the tokenizer's tokens are the defaults then.
        Assign a dict to change them (``lm.generation_config = {"eos_token_id": [2, 7]}``).
        """
        return self._generation_config

    @generation_config.setter
    def generation_config(self, value: dict[str, Any]) -> None:
        if not isinstance(value, dict):
            raise TypeError(at_user_line(
                f"lm.generation_config takes a dict such as {{'eos_token_id': 2}}, got "
                f"{type(value).__name__}."))
        object.__setattr__(self, "_generation_config", dict(value))

    @property
    def generator(self) -> "GeneratorEnvoy":
        """``lm.generator.output`` in a generate block: the prompt and generated tokens."""
        from .generation import GeneratorEnvoy
        from .tracing.steps import RESULT_PATH

        return GeneratorEnvoy(self, RESULT_PATH)

    def generate(
        self,
        *inputs: Any,
        max_new_tokens: int = 20,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = 50,
        top_p: float | None = None,
        seed: int | None = None,
        key: jax.Array | None = None,
        eos_token_id: int | list[int] | None | str = "default",
        pad_token_id: int | None = None,
        repetition_penalty: float | None = 1.0,
        min_new_tokens: int | None = 0,
        stop_strings: str | list[str] | None = None,
        tokenizer: Any = None,
        progress: bool | None = None,
        **unsupported: Any,
    ) -> "GenerateTracer":
        """A block over a generation of ``max_new_tokens`` tokens, with per-step edits.

        Step 0 is the forward over the prompt, step ``s`` the forward over the
        ``s``-th new token; each envoy addresses step 0 until ``.next()``,
        ``tracer.iter[...]`` or ``tracer.all()`` move it. ``tracer.result``
        (also ``lm.generator.output``) is the prompt and the new tokens,
        ``[batch, prompt + max_new_tokens]``. With no input, the body holds
        ``tracer.invoke(prompt)`` blocks, batched into one generation.

        Args:
          do_sample, temperature, top_k, top_p: sampling (greedy by default), with
            transformers' defaults (``top_k=50``; ``top_k=None`` keeps every token).
          seed, key: the sampling's randomness (one or the other). With
            neither, each call draws a fresh seed, as torch's global generator would:
            pass one to reproduce a sample. Under ``jax.jit`` the seed is drawn once,
            when the function is traced: pass ``key=`` as an argument for new samples.
          eos_token_id, pad_token_id: the token that ends a row, or a list of
            such tokens (None: always run ``max_new_tokens`` steps), and the token
            rows get after they ended; generation stops when all have. By default
            both are what transformers' ``generate`` uses: a checkpoint folder's
            ``generation_config.json`` (else its ``config.json``), the pad token
            falling back to the first end token; for a GGUF file, its tokenizer's.
            Only these two defaults come from the generation config: decoding is
            greedy, with no penalty, unless asked.
          repetition_penalty, min_new_tokens: as in transformers' ``generate``
            (greedy or sampled). Its other options, beam search among them, are
            refused with an error.
          stop_strings, tokenizer: a row also ends at the token that completes one
            of these strings in its text, read with ``tokenizer`` (by default
            ``lm.tokenizer``), as transformers' ``stop_strings``. Checked on the
            host after each step: not inside ``jax.jit``.
          progress: a progress bar (by default when stderr is a terminal).

        Example::

            >>> with lm.generate("The Eiffel Tower is in the city of", max_new_tokens=3) as tracer:
            ...     with tracer.all():
            ...         lm.model.layers[10].output[0] = lm.model.layers[10].output[0] + steer
            ...     tokens = tracer.result.save()
        """
        from .generation import GenerateTracer, GenerationConfig

        if unsupported:
            raise TypeError(at_user_line(
                f"lm.generate does not support {', '.join(map(repr, unsupported))}. It takes "
                "max_new_tokens, do_sample, temperature, top_k, top_p, seed or key, "
                "eos_token_id, pad_token_id, repetition_penalty, min_new_tokens, stop_strings "
                "(with tokenizer) and progress; "
                "transformers' other generate options (beam search among them) are not "
                "implemented."
            ))
        unapplied = {k: v for k, v in self.generation_config.items()
                     if k in _DECODING_OPTIONS and v is not None}
        if unapplied and not self._warned_generation_config:
            object.__setattr__(self, "_warned_generation_config", True)
            warn_at_user_line(
                "this checkpoint's generation config sets "
                + ", ".join(f"{k}={v!r}" for k, v in sorted(unapplied.items()))
                + ": lm.generate takes only its end and pad tokens (decoding is greedy unless "
                "asked). Pass the options you want to lm.generate."
            )
        # Defaults as transformers' generate takes them: from the checkpoint folder's
        # generation config (lm.generation_config), else from the tokenizer (GGUF files).
        def default(name: str) -> Any:
            if name in self.generation_config:
                return self.generation_config[name]
            return getattr(self.tokenizer, name, None)

        if isinstance(eos_token_id, str) and eos_token_id == "default":
            eos_token_id = default("eos_token_id")
        if hasattr(eos_token_id, "tolist"):  # a numpy or JAX array of ids
            eos_token_id = np.asarray(eos_token_id).tolist()
        if isinstance(eos_token_id, (list, tuple)):
            if not eos_token_id:
                raise ValueError(at_user_line(
                    "eos_token_id=[] lists no end token: pass eos_token_id=None to always run "
                    "max_new_tokens steps."))
            eos_token_id = tuple(eos_token_id)
        if pad_token_id is None:
            pad_token_id = default("pad_token_id")
        if pad_token_id is None:  # transformers' fallback: the (first) end token
            first = eos_token_id[0] if isinstance(eos_token_id, tuple) else eos_token_id
            pad_token_id = first if first is not None else 0  # no end token: never used
        if isinstance(pad_token_id, np.integer):
            pad_token_id = int(pad_token_id)
        repetition_penalty = 1.0 if repetition_penalty is None else float(repetition_penalty)
        min_new_tokens = 0 if min_new_tokens is None else min_new_tokens
        if isinstance(min_new_tokens, np.integer):
            min_new_tokens = int(min_new_tokens)
        if isinstance(max_new_tokens, np.integer):
            max_new_tokens = int(max_new_tokens)
        temperature, top_k, top_p = (v.item() if isinstance(v, np.generic) else v
                                     for v in (temperature, top_k, top_p))
        ignored = [f"{name}={value!r}" for name, value, neutral in (
            ("temperature", temperature, (1.0,)), ("top_k", top_k, (50, None)),
            ("top_p", top_p, (None, 1.0))) if value not in neutral]
        if ignored and not do_sample:
            warn_at_user_line(f"{', '.join(ignored)} only apply when sampling: decoding is "
                              "greedy. Pass do_sample=True to sample.")
        try:
            config = GenerationConfig(max_new_tokens, do_sample, temperature, top_k, top_p,
                                      eos_token_id, pad_token_id, repetition_penalty,
                                      min_new_tokens, () if stop_strings is None else stop_strings)
        except ValueError as err:
            raise ValueError(at_user_line(str(err))) from None
        tokenizer = self.tokenizer if tokenizer is None else tokenizer
        if config.stop_strings and tokenizer is None:
            raise JnnsightError(at_user_line(
                "stop_strings needs a tokenizer to read the generated text, and this model has "
                "none: pass tokenizer= (or load the model with one)."
            ))
        if min_new_tokens and eos_token_id is None:
            warn_at_user_line(f"min_new_tokens={min_new_tokens} has no effect: there is no "
                              "eos_token_id to hold back.")
        if not isinstance(do_sample, (bool, np.bool_)):
            raise TypeError(at_user_line(f"do_sample must be True or False, got {do_sample!r}."))
        if seed is not None and key is not None:
            raise TypeError(at_user_line(
                "lm.generate takes seed= or key=, not both: each sets the sampling's randomness."))
        if seed is not None and not (is_int(seed) and 0 <= seed < 2**64):
            raise TypeError(at_user_line(f"seed must be an int from 0 to 2**64 - 1, got {seed!r}."))
        if key is None:
            if seed is None:  # a fresh sample per call, as transformers' generate gives
                seed = secrets.randbits(64) if do_sample else 0
            key = jax.random.key(int(seed) & 0xFFFFFFFF)
            if seed >> 32:  # JAX takes 32 bits of a seed; the rest goes into the key too
                key = jax.random.fold_in(key, int(seed) >> 32)
        elif not (isinstance(key, jax.Array) and (jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
                                                  or (key.dtype == jnp.uint32 and key.shape == (2,)))):
            raise TypeError(at_user_line(
                f"key must be a JAX PRNG key (`jax.random.key(3)`), got {key!r}; "
                "or pass seed=3."
            ))
        return GenerateTracer(self, inputs, config, key, progress, tokenizer)

    def _outside(self, consts: list[Any]) -> list[Any]:
        """Arrays from outside the model (a block's, bound variables, an envoy call's
        arguments); those placed elsewhere than ``lm.mesh`` (the user's own mesh, which
        has explicit axes where ``jax.make_mesh`` made it, or one device) moved onto it,
        its ``AxisType.Auto`` copy: JAX runs one program on one mesh."""
        return consts if self.mesh is None else [self._on_mesh(value) for value in consts]

    def _on_mesh(self, value: Any) -> Any:
        """``value`` on ``lm.mesh``; the same copy each time for the same array, so that a
        program keyed by its outside arrays is found again."""
        known = self._moved.get(id(value))
        if known is not None and known[0]() is value:
            return known[1]
        with jax.ensure_compile_time_eval():  # a copy, also while a trace runs
            moved = _onto(value, self.mesh)
        if moved is not value:
            self._moved[id(value)] = (weakref.ref(value), moved)
            weakref.finalize(value, self._moved.pop, id(value), None)
        return moved

    def _move_names(self, namespace: dict[str, Any], names: frozenset[str]) -> dict[str, tuple[Any, Any]]:
        """Put the ``lm.mesh`` copy of each array a block's names hold into ``namespace``
        while its body runs: traced together with the model's values, an array on the
        user's explicit-axes mesh would fail in most operations. ``{name: (array, copy)}``."""
        if self.mesh is None:
            return {}
        moved = {}
        for name in names:
            value = namespace.get(name)
            if isinstance(value, jax.Array):
                copy = self._on_mesh(value)
                if copy is not value:
                    moved[name] = (value, copy)
                    namespace[name] = copy
        return moved

    def _check_ids(self, input_ids: Any, attention_mask: Any, line: UserLine | None) -> None:
        """Refuse ids outside the vocabulary, and rows longer than learned position embeddings.

        An embedding lookup clips out-of-range ids (JAX gathers never fail), so these
        would give plausible wrong numbers. Only values on this host are checked:
        under ``jax.jit`` ids are tracers.
        """
        if not _on_host(input_ids):
            return
        where = functools.partial(at_line, line) if line is not None else at_user_line
        vocab = self._config_value("vocab_size")
        ids, real = np.asarray(input_ids), np.asarray(attention_mask) != 0
        empty = np.flatnonzero(~real.any(axis=1))
        if empty.size:
            raise JnnsightError(where(
                f"row {empty[0]} of the batch is all padding (its attention mask has no 1): "
                "a row needs at least one token."))
        if vocab is not None and real.any():
            used = ids[real]
            if used.min() < 0 or used.max() >= vocab:
                bad = used[(used < 0) | (used >= vocab)][0]
                raise JnnsightError(where(
                    f"token id {bad} is outside this model's vocabulary (0 to {vocab - 1}): "
                    "were the ids made by another model's tokenizer? lm.tokenizer gives this "
                    "model's ids."
                ))
        self._check_positions(real, 0, where)

    def _check_generation(self, attention_mask: Any, new_tokens: int, pad_token_id: int,
                          can_end: bool) -> int | None:
        """What generation feeds the model beyond the checked prompt: ``new_tokens - 1``
        generated tokens after the longest row and, in ended rows, ``pad_token_id``.

        Where rows ``can_end`` (an end token, stop strings) before GPT-2's position
        embeddings run out, as transformers lets them, the number of steps that fit
        is returned instead of an error (None: all do)."""
        vocab = self._config_value("vocab_size")
        if vocab is not None and not 0 <= pad_token_id < vocab:
            raise JnnsightError(at_user_line(
                f"pad_token_id={pad_token_id} is outside this model's vocabulary "
                f"(0 to {vocab - 1}): ended rows are fed that token. It is the argument, else "
                "the generation config's pad or (first) end token; pass pad_token_id= an id "
                "of this vocabulary (and eos_token_id=None if the end token is not one either)."
            ))
        # a traced mask (the user's jax.jit) is taken as all real: its width bounds the rows
        real = (np.asarray(attention_mask) != 0 if _on_host(attention_mask)
                else np.ones(np.shape(attention_mask), bool))
        positions = self._config_value("n_positions")
        fit = None if positions is None else positions - int(real.sum(axis=1).max()) + 1
        if can_end and fit is not None and 1 <= fit < new_tokens:
            return fit
        self._check_positions(real, new_tokens, at_user_line)
        return None

    def _check_positions(self, real: np.ndarray, new_tokens: int, where: Callable[[str], str]) -> None:
        """Rows (``real``: the attention mask as booleans) plus ``new_tokens - 1`` fed-back
        tokens must fit GPT-2's learned position embeddings."""
        positions = self._config_value("n_positions")  # GPT-2's learned positions
        longest = int(real.sum(axis=1).max()) + max(new_tokens - 1, 0)
        if positions is not None and longest > positions:
            what = f"{longest} tokens" if not new_tokens else (
                f"{longest - new_tokens + 1} prompt tokens plus {new_tokens - 1} generated ones fed back")
            raise JnnsightError(where(
                f"{what} are more than this model's {positions} position embeddings "
                f"(n_positions): shorten the input{' or max_new_tokens' if new_tokens else ''}."
            ))

    def _config_value(self, name: str) -> Any:
        return getattr(getattr(self.module, "config", None), name, None)

    def _check_input(self, args: tuple, kwargs: dict, line: UserLine | None) -> None:
        """One input and, optionally, its attention mask: no other argument."""
        nnsight_only = sorted(set(kwargs) & _NNSIGHT_TRACE_OPTIONS.keys())
        if nnsight_only:
            raise JnnsightError(at_line(line,
                f"`{nnsight_only[0]}=` is an nnsight or transformers option that jnnsight "
                "does not have: " + _NNSIGHT_TRACE_OPTIONS[nnsight_only[0]]))
        if len(args) != 1 or set(kwargs) - {"attention_mask"}:
            options = set(inspect.signature(LanguageModel.generate).parameters) | _DECODING_OPTIONS
            generation = sorted(set(kwargs) & options - {"self", "inputs", "unsupported"})
            raise JnnsightError(at_line(line,
                "a language model's invoke takes one input: text, token ids or a tokenizer "
                "output (a dict with input_ids and attention_mask), and optionally an "
                f"attention_mask for the ids; got {len(args)} input(s)"
                + (f" and {', '.join(sorted(kwargs))}." if kwargs else ".")
                + (f" `{generation[0]}=` belongs to `lm.generate(...)`." if generation else "")
                + (" `pad_to_multiple_of=` is the model's: `LanguageModel(..., "
                   "pad_to_multiple_of=16)`." if "pad_to_multiple_of" in kwargs else "")
            ))

    def _collate(self, inputs: list[tuple[tuple, dict] | None], lines: list) -> Batch:
        """Tokenize every invoke's input and left-pad all rows into one batch."""
        # Padded positions are masked, but their ids show in a generation's result: without
        # a pad token, the end token, as nnsight sets it (then 0).
        pad = next((i for i in (getattr(self.tokenizer, "pad_token_id", None),
                                getattr(self.tokenizer, "eos_token_id", None)) if i is not None), 0)
        parts: list[tuple[Any, Any]] = []
        spans: list[tuple[int, int] | None] = []
        total = 0
        for given, line in zip(inputs, lines):
            if given is None:
                spans.append(None)
                continue
            args, kwargs = given
            self._check_input(args, kwargs, line)
            value = {"input_ids": args[0], **kwargs} if kwargs else args[0]
            ids, mask = _invoke_arrays(value, self.tokenizer, line, pad)
            spans.append((total, total + ids.shape[0]))
            total += ids.shape[0]
            parts.append((ids, mask))
        if not parts:
            raise JnnsightError(at_line(lines[0] if lines else None,
                "the trace has no input: pass a prompt to `lm.trace(...)` or to a `tracer.invoke(...)`."
            ))
        length = max(ids.shape[1] for ids, _ in parts)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        # Host arrays are padded on the host; JAX arrays (tracers under jax.jit) on the device.
        xp = np if all(isinstance(ids, np.ndarray) for ids, _ in parts) else jnp
        left = lambda a, value: xp.pad(a, ((0, 0), (length - a.shape[1], 0)), constant_values=value)  # noqa: E731
        input_ids = xp.concatenate([left(ids, pad) for ids, _ in parts])
        attention_mask = xp.concatenate([left(mask, 0) for _, mask in parts]).astype(np.int32)
        invoke_rows = tuple(
            Rows(0, total, total) if span is None else Rows(span[0], span[1], total) for span in spans
        )
        self._check_ids(input_ids, attention_mask, lines[0] if lines else None)  # before int32
        input_ids = input_ids.astype(np.int32)
        input_ids, attention_mask = jnp.asarray(input_ids), jnp.asarray(attention_mask)
        if self.mesh is not None:
            input_ids, attention_mask = shard_inputs((input_ids, attention_mask), self.mesh, self.rules)
        return Batch((input_ids,), {"attention_mask": attention_mask}, invoke_rows)
