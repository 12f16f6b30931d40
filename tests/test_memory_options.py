"""Memory options that must not change a number: --embeddings-on-cpu and --logprob-chunk (CPU, tiny Llama).

A GPU test (`pytest -m gpu`) checks the same on CUDA, where the embedding option actually frees device
memory.
"""

from __future__ import annotations


import pytest
import torch

from dpo import models, train
from dpo.flags import config_from_args
from .conftest import build_tiny_llama, write_jsonl

ROWS = [{"prompt": f"Pick a fruit, round {i}.", "chosen": f" A pear, {i}.", "rejected": f" No fruit {i} today."}
        for i in range(8)]
METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
           "grad_norm")


@pytest.fixture(autouse=True)
def one_thread(single_thread):
    """One thread: the comparisons below are then free of thread-count effects."""


def test_host_embedding_looks_up_exactly_and_stays_off_the_parameters():
    emb = torch.nn.Embedding(50, 8)
    host = models.HostEmbedding(emb.weight)
    ids = torch.tensor([[3, 7, 49, 0], [1, 1, 2, 3]])
    out = host(ids)
    assert torch.equal(out, emb(ids).detach())
    assert out.requires_grad  # as enable_input_require_grads makes it: checkpointed blocks above need a graph
    with torch.no_grad():
        assert not host(ids).requires_grad
    assert list(host.parameters()) == [] and list(host.buffers()) == []  # model.to(...) leaves it where it is
    assert host.weight is host.table and not host.weight.requires_grad


def test_embeddings_on_cpu_and_a_small_logprob_chunk_train_to_the_same_numbers(tiny_llama_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", ROWS)

    def run(name, *extra):
        argv = ["--model", str(tiny_llama_dir), "--dataset", str(data), "--output-dir", str(tmp_path / name),
                "--max-steps", "3", "--per-device-batch-size", "2", "--grad-accum", "2", "--learning-rate", "1e-2",
                "--lora-r", "4", "--max-length", "48", "--device", "cpu", "--seed", "1", *extra]
        return train.run(config_from_args(argv), argv)

    plain = run("plain")
    lean = run("lean", "--embeddings-on-cpu", "--logprob-chunk", "3")
    assert isinstance(models._causal_lm(lean["model"]).get_input_embeddings(), models.HostEmbedding)
    assert abs(plain["history"][-1]["rewards/margins"]) > 1e-4  # the run moved
    for a, b in zip(plain["history"], lean["history"]):
        for k in METRICS:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), (a["step"], k)


def test_embeddings_on_cpu_refuses_a_model_whose_head_shares_the_table(tmp_path, smollm2_tokenizer_dir, capsys):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    model_dir = tmp_path / "tied"
    build_tiny_llama(len(tok), tie_word_embeddings=True).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = write_jsonl(tmp_path / "pairs.jsonl", ROWS)
    rc = train.main(["--model", str(model_dir), "--dataset", str(data), "--output-dir", str(tmp_path / "out"),
                     "--max-steps", "1", "--device", "cpu", "--embeddings-on-cpu"])
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' loading bar
    assert rc == 2, err
    assert err.startswith("dpo: error: --embeddings-on-cpu: this model ties its input embeddings to the LM head"), err
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_table_leaves_the_device_and_the_loss_stays(tiny_llama_dir, tmp_path):
    from . import gpu_results

    data = write_jsonl(tmp_path / "pairs.jsonl", ROWS)
    argv = ["--model", str(tiny_llama_dir), "--dataset", str(data), "--max-steps", "2", "--per-device-batch-size",
            "4", "--learning-rate", "1e-2", "--lora-r", "4", "--max-length", "48", "--device", "cuda", "--backend",
            "hf", "--dtype", "float32", "--seed", "1", "--memory-budget", "none"]
    cfg = config_from_args(argv + ["--output-dir", str(tmp_path / "a")])
    model, _ = train.build_model(cfg, torch.device("cuda"))
    table = models._causal_lm(model).get_input_embeddings().weight
    nbytes = table.numel() * table.element_size()
    del table  # no reference of ours may keep the GPU copy alive
    before = torch.cuda.memory_allocated()
    freed = models.embeddings_to_host(model)
    assert freed == nbytes
    assert before - torch.cuda.memory_allocated() >= freed  # the table's bytes are off the card
    del model
    plain = train.run(config_from_args(argv + ["--output-dir", str(tmp_path / "p")]), argv)["history"]
    lean = train.run(config_from_args(argv + ["--output-dir", str(tmp_path / "l"), "--embeddings-on-cpu"]),
                     argv)["history"]
    for a, b in zip(plain, lean):
        for k in METRICS:
            gpu_results.record(f"embeddings-on-cpu/step{a['step']}/{k}", abs(a[k] - b[k]), 1e-5 * abs(a[k]) + 1e-7)
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), (a["step"], k)


def test_an_embedding_that_does_more_than_a_lookup_is_refused(tiny_model):
    class Scaled(torch.nn.Embedding):  # as Gemma's: rows times a scale, which a host lookup would drop
        def forward(self, ids):
            return super().forward(ids) * 2.0

    plain = tiny_model.get_input_embeddings()
    scaled = Scaled(plain.num_embeddings, plain.embedding_dim)
    tiny_model.set_input_embeddings(scaled)
    with pytest.raises(ValueError, match="Scaled, which does more than look rows up"):
        models.embeddings_to_host(tiny_model)
    assert tiny_model.get_input_embeddings() is scaled  # nothing changed


def test_without_checkpointing_the_lookup_output_needs_no_grad():
    host = models.HostEmbedding(torch.randn(10, 4), output_requires_grad=False)
    assert not host(torch.tensor([[1, 2]])).requires_grad


def test_a_batch_moved_to_the_device_keeps_its_host_ids_for_the_lookup():
    from dpo.data.pairs import Batch

    ids = torch.tensor([[5, 6, 7], [8, 9, 2]])
    ones = torch.ones_like(ids)
    moved = Batch(ids, ones, ones, [0]).to("cpu").to("cpu")
    assert moved.host_input_ids is ids  # a GPU batch hands these to HostEmbedding.lookup: no device sync
