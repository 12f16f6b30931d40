"""dpo/export/gguf_layout.py reads what `gguf.GGUFReader` reads (the oracle): every key's value, every tensor's
name, shape, type and data, on a file written by `gguf.GGUFWriter` and on the real SmolLM2 GGUF; in-place
array writes land where the oracle reads them; a file that is not GGUF, or is cut short, is refused in one
line."""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

gguf = pytest.importorskip("gguf")

from dpo.export import gguf_layout  # noqa: E402


def assert_same_as_oracle(path):
    layout = gguf_layout.read_layout(path)
    reader = gguf.GGUFReader(str(path))
    # GGUFReader adds the header's own three entries as fields
    keys = [k for k in reader.fields if not k.startswith("GGUF.")]
    assert list(layout.fields) == keys
    for key in keys:
        expected, got = reader.fields[key].contents(), layout.fields[key]
        if isinstance(got, gguf_layout.ArrayRef):
            assert got.count == len(expected), key
            if got.item_type in gguf_layout.NUMPY:
                np.testing.assert_array_equal(layout.array(key), np.asarray(expected), err_msg=key)
        elif isinstance(expected, float):
            assert got == pytest.approx(expected, rel=1e-7), key
        else:
            assert got == expected, key
    assert [t.name for t in layout.tensors] == [t.name for t in reader.tensors]
    for ours, theirs in zip(layout.tensors, reader.tensors):
        assert ours.ggml_type == theirs.tensor_type and ours.shape == tuple(int(d) for d in theirs.shape)
        assert ours.offset == theirs.data_offset
        np.testing.assert_array_equal(np.asarray(gguf_layout.tensor_data(layout, ours)), np.asarray(theirs.data))
    return layout


def write_file(path, tokens: list[str], scores: list[float], alignment: int | None = None):
    w = gguf.GGUFWriter(str(path), "llama")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    w.add_uint32("llama.block_count", 2)
    w.add_float32("llama.rope.freq_base", 10000.5)
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_string("tokenizer.ggml.model", "llama")
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.scores", scores)
    w.add_array("tokenizer.ggml.token_type", [1] * len(tokens))
    w.add_int64("some.int64", -7)
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((len(tokens), 32)).astype(np.float32))
    w.add_tensor("blk.0.attn_q.weight", rng.standard_normal((32, 32)).astype(np.float16))
    q8 = gguf.quants.quantize(rng.standard_normal((32, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.ffn_up.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tokens=st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=40),
       alignment=st.sampled_from([None, 64, 128]))
def test_the_layout_reads_what_the_gguf_reader_reads(tmp_path_factory, tokens, alignment):
    path = write_file(tmp_path_factory.mktemp("g") / "m.gguf", tokens, [-float(i) for i in range(len(tokens))],
                      alignment)
    layout = assert_same_as_oracle(path)
    assert layout.fields["tokenizer.ggml.tokens"].item_type == gguf_layout.STRING


def test_an_array_written_in_place_is_what_the_gguf_reader_then_reads(tmp_path):
    path = write_file(tmp_path / "m.gguf", ["a", "b", "c"], [0.0, -1.0, -2.0])
    scores = gguf_layout.read_layout(path).array("tokenizer.ggml.scores", "r+")
    scores[:] = [-5.0, -6.0, -7.0]
    scores.flush()
    del scores
    assert list(gguf.GGUFReader(str(path)).fields["tokenizer.ggml.scores"].contents()) == [-5.0, -6.0, -7.0]
    with pytest.raises(gguf_layout.GGUFLayoutError, match="not an array of numbers"):
        gguf_layout.read_layout(path).array("tokenizer.ggml.tokens")


def test_the_real_smollm2_file_reads_as_the_gguf_reader_reads_it_in_a_fraction_of_its_time():
    from dpo import smollm2

    try:
        path = smollm2.gguf_path()
    except smollm2.MissingDefaultModel as e:
        pytest.skip(str(e))
    t = time.perf_counter()
    layout = gguf_layout.read_layout(path)
    ours = time.perf_counter() - t
    t = time.perf_counter()
    gguf.GGUFReader(str(path))
    theirs = time.perf_counter() - t
    assert layout.fields["tokenizer.ggml.tokens"].count == 49152 and len(layout.tensors) > 100
    assert ours < theirs / 5, (ours, theirs)
    assert_same_as_oracle(path)


def test_a_file_that_is_not_gguf_or_is_cut_short_is_refused_in_one_line(tmp_path):
    other = tmp_path / "x.gguf"
    other.write_bytes(b"PK\x03\x04" + b"\0" * 64)
    with pytest.raises(gguf_layout.GGUFLayoutError, match="not a GGUF file"):
        gguf_layout.read_layout(other)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(gguf_layout.GGUFLayoutError, match="not a GGUF file"):
        gguf_layout.read_layout(empty)
    whole = write_file(tmp_path / "m.gguf", ["a", "b"], [0.0, -1.0]).read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[:60])
    with pytest.raises(gguf_layout.GGUFLayoutError, match="ends early"):
        gguf_layout.read_layout(cut)
