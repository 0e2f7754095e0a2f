"""Weights: save per rank through every connector, load back bit for bit, refuse what is wrong."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from kvswap.connectors import open_connector
from kvswap.engine import build_model
from kvswap.errors import ConfigError, IntegrityError, NotFoundError
from kvswap.testing.connector_suite import store_uri as shared_store_uri
from kvswap.weights import load, read_files, read_manifest, save
from kvswap.weights.manifest import MANIFEST_KEY

TOKENIZER_BYTES = bytes(range(256)) * 3 + os.urandom(100)  # a binary tokenizer file rides along


def make_checkpoint(directory: Path, *, dtype: str = "float32", seed: int = 0, **overrides: object) -> torch.nn.Module:
    """A tiny Llama saved as a Hugging Face checkpoint in several safetensors shards."""
    model, _ = build_model("tiny", dtype=dtype, seed=seed, **overrides)
    model.save_pretrained(directory, max_shard_size="100KB")
    (directory / "tokenizer.model").write_bytes(TOKENIZER_BYTES)
    (directory / "tokenizer_config.json").write_text('{"model_max_length": 4096}')
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    directory = tmp_path_factory.mktemp("ckpt")
    model = make_checkpoint(directory)
    return directory, {n: t.detach().clone() for n, t in model.state_dict().items()}


def store_uri(kind: str, tmp_path: Path) -> str:
    return shared_store_uri(kind, f"{tmp_path}/saved", f"w{os.urandom(5).hex()}")


def empty_model(**overrides: object) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvswap.engine.model import MODEL_CONFIGS

    config = LlamaConfig(**{**MODEL_CONFIGS["tiny"], **overrides}, tie_word_embeddings=False)
    with torch.device("meta"):
        return LlamaForCausalLM(config).eval()


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.arange(1, 40, device=next(model.parameters()).device).unsqueeze(0)).logits


STORES = ["file", "juicefs", "redis", "valkey", "s3"]


@pytest.mark.parametrize("kind", STORES)
def test_save_and_load_round_trip(kind: str, checkpoint: tuple[Path, dict], tmp_path: Path) -> None:
    directory, original = checkpoint
    uri = store_uri(kind, tmp_path)
    manifest = save(directory, uri, tp=1, chunk_bytes=48 << 10, progress=False)  # tensors span chunks
    assert any(len(r.chunks) > 1 for r in manifest.ranks)
    assert max(t.nbytes for t in manifest.ranks[0].tensors) > manifest.chunk_bytes
    model = empty_model()
    result = load(model, uri, progress=False)
    assert set(result.tensors) == set(original)
    for name, tensor in original.items():
        assert torch.equal(result.tensors[name], tensor), name
    reference = _from_pretrained(directory)
    assert torch.equal(logits(model), logits(reference))
    files = read_files(uri)
    assert files["tokenizer.model"] == TOKENIZER_BYTES
    assert files["config.json"] == (directory / "config.json").read_bytes()
    assert result.stats.bytes == sum(t.numel() * t.element_size() for t in original.values())


def _from_pretrained(directory: Path) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(directory).eval()


@pytest.mark.parametrize("kind", ["file", "s3"])
def test_load_straight_from_a_checkpoint_directory(kind: str, checkpoint: tuple[Path, dict], tmp_path: Path) -> None:
    directory, original = checkpoint
    if kind == "file":
        uri = f"file://{directory}"
    else:
        uri = store_uri("s3", tmp_path)
        with open_connector(uri) as s3:
            for path in directory.iterdir():
                s3.put(path.name, path.read_bytes())
    model = empty_model()
    result = load(model, uri, read_bytes=40 << 10, progress=False)
    for name, tensor in original.items():
        assert torch.equal(result.tensors[name], tensor), name
    assert torch.equal(logits(model), logits(_from_pretrained(directory)))


@pytest.mark.parametrize("source", ["saved", "checkpoint"])
def test_tp2_shards_reassemble(source: str, checkpoint: tuple[Path, dict], tmp_path: Path) -> None:
    directory, original = checkpoint
    uri = f"file://{directory}"
    if source == "saved":
        uri = f"file://{tmp_path}/tp2"
        manifest = save(directory, uri, tp=2, chunk_bytes=32 << 10, progress=False)
        assert (manifest.tp, len(manifest.ranks)) == (2, 2)
    shards = [load(None, uri, rank=r, tp=2, progress=False, read_bytes=32 << 10).tensors for r in range(2)]
    splits = {"q_proj": 0, "k_proj": 0, "v_proj": 0, "gate_proj": 0, "up_proj": 0, "o_proj": 1, "down_proj": 1,
              "lm_head": 0}
    for name, tensor in original.items():
        kind = next((dim for key, dim in splits.items() if f"{key}." in name), None)
        if kind is None:  # replicated: whole on both ranks
            assert torch.equal(shards[0][name], tensor) and torch.equal(shards[1][name], tensor), name
        else:
            assert shards[0][name].shape[kind] == tensor.shape[kind] // 2, name
            assert torch.equal(torch.cat([shards[0][name], shards[1][name]], dim=kind), tensor), name


def test_corrupted_chunk_names_the_tensor(checkpoint: tuple[Path, dict], tmp_path: Path) -> None:
    directory, _ = checkpoint
    uri = f"file://{tmp_path}/saved"
    manifest = save(directory, uri, chunk_bytes=64 << 10, progress=False)
    chunk = manifest.ranks[0].chunks[3]
    path = tmp_path / "saved" / chunk.key
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"checksum mismatch in .*holding model\."):
        load(None, uri, progress=False)
    path.unlink()
    with pytest.raises(IntegrityError, match="missing"):
        load(None, uri, progress=False)


def test_missing_and_half_written_saves_fail_clearly(checkpoint: tuple[Path, dict], tmp_path: Path) -> None:
    directory, _ = checkpoint
    with pytest.raises(NotFoundError, match="nothing to load"):
        load(None, f"file://{tmp_path}/nothing", progress=False)
    uri = f"file://{tmp_path}/half"
    save(directory, uri, progress=False)
    (tmp_path / "half" / MANIFEST_KEY).unlink()  # what a save that died before its last step leaves
    with pytest.raises(NotFoundError, match="did not finish"):
        load(None, uri, progress=False)
    with pytest.raises(NotFoundError, match="did not finish"):
        read_manifest(open_connector(uri))


def test_resave_replaces_the_old_chunks(checkpoint: tuple[Path, dict], tmp_path: Path) -> None:
    directory, original = checkpoint
    uri = f"file://{tmp_path}/again"
    first = save(directory, uri, tp=2, chunk_bytes=64 << 10, progress=False)
    second = save(directory, uri, tp=1, chunk_bytes=64 << 10, progress=False)
    keys = set(open_connector(uri).list("ranks/"))
    assert keys == {c.key for r in second.ranks for c in r.chunks}
    assert not keys & {c.key for r in first.ranks for c in r.chunks}
    loaded = load(None, uri, progress=False).tensors
    assert all(torch.equal(loaded[n], t) for n, t in original.items())


def test_tp_mismatch_and_wrong_model_are_refused(checkpoint: tuple[Path, dict], tmp_path: Path) -> None:
    directory, _ = checkpoint
    uri = f"file://{tmp_path}/tp2"
    save(directory, uri, tp=2, progress=False)
    with pytest.raises(ConfigError, match="saved for tp=2; asked to load tp=1"):
        load(None, uri, tp=1, progress=False)
    with pytest.raises(ConfigError, match=r"q_proj.weight.*shape .*tp=2"):
        load(empty_model(), uri, rank=0, progress=False)  # a whole model cannot take a TP shard
    with pytest.raises(ConfigError, match="rank 2 is outside"):
        load(None, uri, rank=2, progress=False)
    with pytest.raises(ConfigError, match="not in the model: model.layers.3"):
        load(empty_model(num_hidden_layers=4 - 1), f"file://{directory}", progress=False)
    with pytest.raises(ConfigError, match="does not split evenly over tp=3|does not split over tp=3"):
        save(directory, f"file://{tmp_path}/tp3", tp=3, progress=False)


def test_bfloat16_and_pipeline_stages(tmp_path: Path) -> None:
    directory = tmp_path / "bf16"
    model = make_checkpoint(directory, dtype="bfloat16", seed=3)
    original = model.state_dict()
    uri = f"file://{tmp_path}/pp2"
    manifest = save(directory, uri, tp=2, pp=2, chunk_bytes=32 << 10, progress=False)
    assert [(r.rank, r.tp_rank, r.pp_rank) for r in manifest.ranks] == [(0, 0, 0), (1, 1, 0), (2, 0, 1), (3, 1, 1)]
    stage = {r.rank: {t.name for t in r.tensors} for r in manifest.ranks}
    assert "model.embed_tokens.weight" in stage[0] and "model.embed_tokens.weight" not in stage[2]
    assert "lm_head.weight" in stage[2] and "model.layers.3.mlp.up_proj.weight" in stage[3]
    assert "model.layers.0.mlp.up_proj.weight" not in stage[2]
    assert stage[0] | stage[2] == set(original)
    loaded = load(None, uri, rank=3, progress=False).tensors
    name = "model.layers.3.self_attn.o_proj.weight"
    assert loaded[name].dtype == torch.bfloat16 and torch.equal(loaded[name], original[name].chunk(2, dim=1)[1])


def test_the_digest_names_the_weights_by_content(checkpoint: tuple[Path, dict], tmp_path: Path) -> None:
    """LoadStats.digest (what the service puts in KV fingerprints): same bytes, same digest;
    other weights in the same shapes and files, another; digest=False skips it for checkpoints."""
    path, _ = checkpoint
    first = load(None, f"file://{path}").stats.digest
    assert first.startswith("sha256:") and load(None, f"file://{path}").stats.digest == first
    assert load(None, f"file://{path}", digest=False).stats.digest == ""
    make_checkpoint(tmp_path / "other", seed=1)
    assert load(None, f"file://{tmp_path / 'other'}").stats.digest != first


def _tied_model(seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvswap.engine.model import MODEL_CONFIGS

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**MODEL_CONFIGS["tiny"], tie_word_embeddings=True)).eval()


@pytest.mark.parametrize("source", ["checkpoint", "checkpoint-with-both-names", "save"])
def test_tied_embeddings_load_and_stay_tied(source: str, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    original = _tied_model()
    directory = tmp_path / "tied"
    original.save_pretrained(directory)  # writes the embedding once
    if source == "checkpoint-with-both-names":  # some checkpoints carry the LM head too
        (directory / "model.safetensors").unlink()
        save_file({n: t.contiguous().clone() for n, t in original.state_dict().items()},
                  directory / "model.safetensors", metadata={"format": "pt"})
    uri = f"file://{directory}"
    if source == "save":
        uri = f"file://{tmp_path}/saved"
        save(directory, uri, progress=False)
    model = _tied_model(seed=1).to("meta")
    load(model, uri, progress=False)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(logits(model), logits(original))


KILLED_SAVE = """
import sys
from kvswap.weights import save
save(sys.argv[1], sys.argv[2], chunk_bytes=4096, threads=1, progress=False)
"""


def test_what_a_killed_save_left_is_gone_after_the_next_save(checkpoint: tuple[Path, dict], tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    directory, original = checkpoint
    uri = f"file://{tmp_path}/killed"
    for _ in range(2):  # two saves die midway, each leaving its chunks
        before = len(list((tmp_path / "killed").glob("ranks/*/*")))
        proc = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(directory), uri])
        began = time.monotonic()
        while len(list((tmp_path / "killed").glob("ranks/*/*"))) < before + 20:
            assert proc.poll() is None and time.monotonic() - began < 60, "the save ended before it was killed"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (tmp_path / "killed" / MANIFEST_KEY).exists()
    left = set(open_connector(uri).list("ranks/"))
    assert len({key.split("/")[-1].split("-")[0] for key in left}) == 2 and len(left) >= 38
    manifest = save(directory, uri, chunk_bytes=64 << 10, progress=False)
    assert set(open_connector(uri).list("ranks/")) == {c.key for r in manifest.ranks for c in r.chunks}
    # kvswap weights gc does the same for leftovers that appear later (and refuses without a save)
    store = open_connector(uri)
    store.put("ranks/00000/deadbeef0000-000000", b"an orphan")
    from kvswap.cli import main

    assert main(["weights", "gc", uri]) == 0
    assert set(store.list("ranks/")) == {c.key for r in manifest.ranks for c in r.chunks}
    assert main(["weights", "gc", f"file://{tmp_path}/empty"]) == 2
    loaded = load(None, uri, progress=False).tensors
    assert all(torch.equal(loaded[n], t) for n, t in original.items())


@pytest.mark.parametrize("source", ["save", "checkpoint"])
def test_a_serve_boot_opens_its_source_once(source: str, checkpoint: tuple[Path, dict], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The files, the shard check and the load of one `kvswap serve` boot read one manifest
    (or one set of checkpoint headers): one save, read once."""
    import kvswap.weights.sources as sources
    from kvswap.service.model import load_model

    directory, original = checkpoint
    uri = f"file://{directory}"
    if source == "save":
        uri = f"file://{tmp_path}/save"
        save(directory, uri, tp=1, progress=False)
    opened = []
    real = sources.open_source
    monkeypatch.setattr(sources, "open_source", lambda connector: opened.append(connector) or real(connector))
    loaded = load_model(uri, device="cpu")
    assert len(opened) == 1
    assert loaded.files["config.json"] == (directory / "config.json").read_text()
    state = loaded.model.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in original.items())


STREAM_DEVICE = "cuda" if os.environ.get("KVSWAP_TEST_DEVICE") == "cuda" else "cpu"


@pytest.mark.parametrize("kind", ["checkpoint", "file", "valkey"])
@pytest.mark.parametrize("batch_bytes", [1, 300 << 10, 1 << 40])
def test_a_stream_gives_every_tensor_once_in_batches(kind: str, batch_bytes: int, checkpoint: tuple[Path, dict],
                                                     tmp_path: Path) -> None:
    from kvswap.weights.load import TensorStream
    from kvswap.weights.sources import split_plan

    directory, expected = checkpoint
    uri = f"file://{directory}" if kind == "checkpoint" else store_uri(kind, tmp_path)
    if kind != "checkpoint":
        save(directory, uri, chunk_bytes=48 << 10, progress=False)
    stream = TensorStream(uri, device=STREAM_DEVICE, read_bytes=40 << 10, batch_bytes=batch_bytes, progress=False)
    batches = split_plan(stream.plan, batch_bytes)
    assert [r for b in batches for r in b.reads] == list(stream.plan.reads)
    if batch_bytes == 1:
        assert len(batches) == len(stream.plan.reads) > 10
        assert sum(len(b.tensors) for b in batches) > len(expected)  # tensors that span reads, and batches
    got = dict(stream)
    assert got.keys() == expected.keys()
    for name, tensor in got.items():
        assert tensor.device.type == STREAM_DEVICE
        assert torch.equal(tensor.cpu(), expected[name]), name
    assert stream.stats.read_bytes >= stream.stats.bytes == sum(t.nbytes for t in expected.values())
    assert stream.stats.seconds > 0


def test_a_stream_stops_early_and_raises_damage_where_it_is_met(checkpoint: tuple[Path, dict],
                                                                 tmp_path: Path) -> None:
    from kvswap.weights.load import TensorStream

    directory, _ = checkpoint
    uri = f"file://{tmp_path}/saved"
    manifest = save(directory, uri, chunk_bytes=48 << 10, progress=False)
    stream = TensorStream(uri, device=STREAM_DEVICE, batch_bytes=100 << 10, progress=False)
    taken = []
    for name, _tensor in stream:  # the consumer stops after three tensors: the loading thread ends
        taken.append(name)
        if len(taken) == 3:
            break
    assert len(taken) == 3
    chunk = manifest.ranks[0].chunks[-1]
    path = tmp_path / "saved" / chunk.key
    data = bytearray(path.read_bytes())
    data[5] ^= 1
    path.write_bytes(bytes(data))
    seen = []
    with pytest.raises(IntegrityError, match="checksum mismatch"):
        for name, _tensor in TensorStream(uri, device=STREAM_DEVICE, batch_bytes=100 << 10, progress=False):
            seen.append(name)
    assert seen  # the batches before the damaged chunk were handed over
