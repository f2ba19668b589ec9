"""Make the golden files in models/: tiny checkpoints and transformers' reference logits.

For each family a tiny transformers PyTorch model (2 layers, float32, eager
attention) gets every weight redrawn from N(0, 0.5) with a fixed seed (the
default initialization gives logits near 0 and hides RoPE and mask bugs), is
saved with ``save_pretrained`` (``config.json`` + ``model.safetensors``) in
``models/tiny-<family>/``, and is run by torch on fixed token ids:

- ``golden.npz``: ``ids`` [2, 9] and their ``logits``; a left-padded batch
  ``padded_ids`` [3, 9] with ``padded_mask``, ``padded_positions``
  (``clip(cumsum(mask) - 1, 0)``, passed to torch explicitly) and
  ``padded_logits`` (only the positions where the mask is 1 mean anything).
- ``golden.json``: versions, seed, config overrides and how the files were made.

tests/test_goldens.py compares jnnsight's models with these files without torch.
The files are written byte for byte the same on every run with the same torch
and transformers (the npz's zip entries carry a fixed date), so rerunning the
script leaves git clean unless transformers' numbers changed.

Usage::

    python scripts/make_goldens.py            # all families, into models/
    python scripts/make_goldens.py --check    # recompute and compare with the files, write nothing
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import shutil
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
SEED = 0
STD = 0.5
BATCH, LENGTH = 2, 9
PADS = (0, 3, 6)  # left padding of each row of the padded batch
PAD_ID = 0
VOCAB = 101

LLAMA_TINY = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
    max_position_embeddings=64,
)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}

# folder name: (transformers family, config keyword arguments, what the case covers)
FAMILIES: dict[str, tuple[str, dict, str]] = {
    "gpt2": ("GPT2", dict(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                          bos_token_id=0, eos_token_id=0),
             "GPT-2: learned positions, LayerNorm, gelu_new, Conv1D weights, tied lm_head"),
    "llama": ("Llama", dict(LLAMA_TINY, rope_theta=5000.0, rope_scaling=LLAMA3,
                            attention_bias=True, mlp_bias=True),
              "Llama 3: llama3 RoPE scaling, rope_theta 5000, GQA, attention and MLP biases, untied"),
    "mistral": ("Mistral", dict(LLAMA_TINY, rope_theta=5000.0, sliding_window=4),
                "Mistral: sliding window 4 on every layer, GQA, untied"),
    "qwen2": ("Qwen2", dict(LLAMA_TINY, rope_theta=5000.0, use_sliding_window=True,
                            sliding_window=4, max_window_layers=1, tie_word_embeddings=True),
              "Qwen2: q/k/v biases, layer 0 full and layer 1 sliding (window 4), tied lm_head"),
    "qwen3": ("Qwen3", dict(LLAMA_TINY, rope_theta=5000.0, attention_bias=True),
              "Qwen3: RMSNorm on q and k (q_norm, k_norm), attention biases, untied"),
}


def token_ids() -> dict[str, np.ndarray]:
    """The inputs every family is run on (the same for all families)."""
    rng = np.random.default_rng(SEED)
    ids = rng.integers(1, VOCAB, (BATCH, LENGTH)).astype(np.int32)
    padded = rng.integers(1, VOCAB, (len(PADS), LENGTH)).astype(np.int32)
    mask = np.ones_like(padded)
    for row, pad in enumerate(PADS):
        padded[row, :pad] = PAD_ID
        mask[row, :pad] = 0
    positions = np.clip(np.cumsum(mask, -1) - 1, 0, None).astype(np.int32)
    return dict(ids=ids, padded_ids=padded, padded_mask=mask, padded_positions=positions)


def build_torch_model(family: str):
    import torch
    import transformers

    name, kwargs, _ = FAMILIES[family]
    torch.manual_seed(SEED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # a copy: transformers writes rope_theta into the rope_scaling dict it is given
        config = getattr(transformers, f"{name}Config")(**copy.deepcopy(kwargs), attn_implementation="eager")
        model_class = getattr(transformers, "GPT2LMHeadModel" if name == "GPT2" else f"{name}ForCausalLM")
        model = model_class(config).float().eval()
    with torch.no_grad():
        for p in model.parameters():  # every weight, norms included; tied weights once
            p.normal_(0.0, STD)
    return model


def reference_logits(model, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import torch

    def run(ids, **kwargs):
        with torch.no_grad():
            kwargs = {k: torch.as_tensor(v.astype(np.int64)) for k, v in kwargs.items()}
            return model(torch.as_tensor(ids.astype(np.int64)), **kwargs).logits.numpy()

    logits = run(inputs["ids"])
    padded = run(inputs["padded_ids"], attention_mask=inputs["padded_mask"],
                 position_ids=inputs["padded_positions"])
    real = inputs["padded_mask"].astype(bool)
    padded = np.where(real[..., None], padded, 0.0).astype(np.float32)  # pad positions: no meaning
    return dict(logits=logits.astype(np.float32), padded_logits=padded)


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An uncompressed .npz whose bytes depend on the arrays only (fixed zip dates)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for key in sorted(arrays):
            array = io.BytesIO()
            np.lib.format.write_array(array, np.ascontiguousarray(arrays[key]), allow_pickle=False)
            archive.writestr(zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0)),
                             array.getvalue())
    return buffer.getvalue()


def make(family: str, out: Path) -> dict[str, np.ndarray]:
    """Write ``out/`` for one family; return the golden arrays."""
    import torch
    import transformers

    model = build_torch_model(family)
    inputs = token_ids()
    arrays = {**inputs, **reference_logits(model, inputs)}
    assert np.abs(arrays["logits"]).max() > 1.0, "weights near zero: the goldens would be weak"

    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out, safe_serialization=True)
    for extra in out.iterdir():  # generation_config.json: not read by jnnsight
        if extra.name not in ("config.json", "model.safetensors"):
            extra.unlink()
    (out / "golden.npz").write_bytes(npz_bytes(arrays))
    name, kwargs, covers = FAMILIES[family]
    meta = {
        "family": family,
        "covers": covers,
        "made_by": "python scripts/make_goldens.py",
        "how": (f"transformers.{type(model).__name__}({name}Config(**config_kwargs, "
                f"attn_implementation='eager')) in float32; torch.manual_seed({SEED}); every "
                f"parameter redrawn with p.normal_(0.0, {STD}); save_pretrained(safe_serialization=True); "
                "logits = model(ids).logits and model(padded_ids, attention_mask=padded_mask, "
                "position_ids=padded_positions).logits (zeroed where padded_mask is 0)"),
        "config_kwargs": kwargs,
        "seed": SEED,
        "std": STD,
        "inputs": {"ids": f"numpy default_rng({SEED}).integers(1, {VOCAB}, ({BATCH}, {LENGTH}))",
                   "padded_ids": f"next draw, ({len(PADS)}, {LENGTH}); row i left-padded by "
                                 f"{list(PADS)}[i] with id {PAD_ID}",
                   "padded_positions": "clip(cumsum(padded_mask, -1) - 1, 0)"},
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__,
                     "numpy": np.__version__, "python": sys.version.split()[0]},
        "max_abs_logit": round(float(np.abs(arrays["logits"]).max()), 3),
    }
    (out / "golden.json").write_text(json.dumps(meta, indent=2) + "\n")
    return arrays


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("families", nargs="*", choices=[*FAMILIES, []], metavar="FAMILY",
                        help=f"some of {', '.join(FAMILIES)} (all when none is named)")
    parser.add_argument("--out", type=Path, default=MODELS)
    parser.add_argument("--check", action="store_true",
                        help="recompute into a temporary folder and compare with --out; write nothing")
    args = parser.parse_args()
    worst = 0.0
    for family in args.families or list(FAMILIES):
        if args.check:
            with tempfile.TemporaryDirectory() as tmp:
                fresh = make(family, Path(tmp) / family)
            with np.load(args.out / f"tiny-{family}" / "golden.npz") as stored:
                diff = max(float(np.abs(stored[k].astype(np.float64) - fresh[k]).max()) for k in fresh)
            worst = max(worst, diff)
            print(f"tiny-{family}: max abs difference from the stored goldens {diff:.3g}")
            continue
        out = args.out / f"tiny-{family}"
        make(family, out)
        size = sum(f.stat().st_size for f in out.iterdir())
        print(f"{out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}: "
              f"{size / 1024:.0f} KiB ({', '.join(sorted(f.name for f in out.iterdir()))})")
    return 1 if args.check and worst > 1e-6 else 0


if __name__ == "__main__":
    sys.exit(main())
