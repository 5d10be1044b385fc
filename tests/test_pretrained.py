import json
import os
import pickle
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import load_file

from minillm.generate import load_model
from minillm.model import MiniGPT
from minillm.pretrained import load_pretrained, save_pretrained
from minillm.tokenizer import TokenizerConfig, train_tokenizer
from tests.conftest import FIXTURES, micro_config


def same_logits(a, b, vocab):
    ids = torch.randint(0, vocab, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits, atol=0, rtol=0)


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": False}, {"n_experts": 4, "n_shared_experts": 1}])
def test_exported_folder_round_trips(tokenizer, tmp_path, overrides):
    torch.manual_seed(0)
    model = MiniGPT(micro_config(tokenizer.vocab_size, **overrides))
    out = save_pretrained(model, tokenizer, tmp_path / "final")
    assert {p.name for p in out.iterdir()} == {
        "config.json",
        "model.safetensors",
        "tokenizer.model",
        "minillm.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
    }
    loaded, tok = load_model(str(out))
    assert not loaded.training and tok.sha256 == tokenizer.sha256
    same_logits(model, loaded, tokenizer.vocab_size)
    meta = json.loads((out / "minillm.json").read_text())
    assert meta["kind"] == "lm" and meta["tokenizer_sha256"] == tokenizer.sha256 and meta["format_version"] == 1


def test_exported_folder_uses_llama_names_and_config(tokenizer, tmp_path):
    model = MiniGPT(micro_config(tokenizer.vocab_size))
    out = save_pretrained(model, tokenizer, tmp_path / "final")
    tensors = load_file(out / "model.safetensors")
    assert "model.layers.0.self_attn.q_proj.weight" in tensors
    assert "model.embed_tokens.weight" in tensors and "model.norm.weight" in tensors
    assert "lm_head.weight" not in tensors  # tied: HF recomputes it from the embedding
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["intermediate_size"]) == (4, 2, 192)
    untied = save_pretrained(
        MiniGPT(micro_config(tokenizer.vocab_size, tie_embeddings=False)), tokenizer, tmp_path / "u"
    )
    assert "lm_head.weight" in load_file(untied / "model.safetensors")


@pytest.mark.parametrize(
    "field, value",
    [
        ("rope_scaling", {"rope_type": "llama3", "factor": 8.0}),
        ("hidden_act", "gelu"),
        ("attention_bias", True),
        ("mlp_bias", True),
        ("sliding_window", 4096),
        ("pretraining_tp", 2),
        ("rope_parameters", {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}),
    ],
)
def test_a_transformers_folder_with_a_field_we_do_not_compute_is_refused_by_name(tokenizer, tmp_path, field, value):
    out = save_pretrained(MiniGPT(micro_config(tokenizer.vocab_size)), tokenizer, tmp_path / "hf")
    (out / "minillm.json").unlink()  # a folder transformers saved: read from config.json
    config = json.loads((out / "config.json").read_text())
    assert config.get("hidden_act", "silu") == "silu" and not config.get("rope_scaling")  # our export is accepted
    load_pretrained(out)
    (out / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(ValueError, match=rf"config.json: {field}(.rope_type)?=.* is not supported"):
        load_pretrained(out)


def write_checkpoint(path, model, tokenizer):
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    hparams = {"config": {"model": asdict(model.config)}, "tokenizer_sha256": tokenizer.sha256}
    torch.save({"state_dict": state, "hyper_parameters": hparams, "global_step": 3}, path)


def test_training_checkpoint_loads_with_the_tokenizer_beside_it(tokenizer, tmp_path):
    torch.manual_seed(0)
    model = MiniGPT(micro_config(tokenizer.vocab_size))
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    tokenizer.save(tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints" / "step-000003.ckpt"
    write_checkpoint(ckpt, model, tokenizer)
    loaded, _ = load_model(str(ckpt))
    same_logits(model, loaded, tokenizer.vocab_size)


def test_checkpoint_with_a_pickle_payload_is_refused_without_running_it(tokenizer, tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    ckpt = tmp_path / "evil.ckpt"
    with ckpt.open("wb") as f:
        pickle.dump({"state_dict": {}, "hyper_parameters": Payload()}, f, protocol=2)
    with pytest.raises(ValueError, match="weights_only=True"):
        load_model(str(ckpt))
    assert not marker.exists()


def test_truncated_checkpoint_is_a_clear_error(tokenizer, tmp_path):
    model = MiniGPT(micro_config(tokenizer.vocab_size))
    ckpt = tmp_path / "last.ckpt"
    write_checkpoint(ckpt, model, tokenizer)
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(ValueError, match=f"cannot load checkpoint {ckpt}"):
        load_model(str(ckpt))


def test_weights_with_another_tokenizer_are_refused(tokenizer, tmp_path):
    out = save_pretrained(MiniGPT(micro_config(tokenizer.vocab_size)), tokenizer, tmp_path / "final")
    lines = (FIXTURES / "corpus.txt").read_text(encoding="utf-8").splitlines() * 10
    other = train_tokenizer(
        lines + ["zebra quantum flux capacitor"] * 50,
        tmp_path / "other",
        TokenizerConfig(vocab_size=512, character_coverage=1.0),
    )
    assert other.sha256 != tokenizer.sha256
    other.save(out)  # overwrite the folder's tokenizer
    with pytest.raises(ValueError, match=f"tokenizer sha256 {tokenizer.sha256[:12]}.*sha256 {other.sha256[:12]}"):
        load_model(str(out))


def test_weights_that_do_not_match_the_config_are_refused(tokenizer, tmp_path):
    out = save_pretrained(MiniGPT(micro_config(tokenizer.vocab_size)), tokenizer, tmp_path / "final")
    meta = json.loads((out / "minillm.json").read_text())
    meta["model"]["n_embd"] = 128
    (out / "minillm.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="wrong shape: .*embed_tokens"):
        load_model(str(out))
    meta["model"]["n_embd"], meta["model"]["n_layer"] = 64, 3
    (out / "minillm.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"missing: \['layers.2"):
        load_model(str(out))


def test_missing_or_foreign_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model at"):
        load_model(str(tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no minillm.json"):
        load_model(str(tmp_path / "empty"))


def test_export_refuses_a_mixture_of_experts_model_clearly(tokenizer, tmp_path):
    from minillm.export import export

    moe = MiniGPT(micro_config(tokenizer.vocab_size, n_experts=4, n_experts_per_tok=2))
    folder = save_pretrained(moe, tokenizer, tmp_path / "moe")
    with pytest.raises(ValueError, match="mixture-of-experts model: exporting it to the transformers format is not"):
        export(folder, tmp_path / "out")


def test_load_model_dtype_for_generation(tokenizer, tmp_path):
    torch.manual_seed(0)
    out = save_pretrained(MiniGPT(micro_config(tokenizer.vocab_size)), tokenizer, tmp_path / "final")
    auto, _ = load_model(str(out))  # auto on CPU: fp32, the weights exactly as saved
    assert {p.dtype for p in auto.parameters()} == {torch.float32}
    bf16, _ = load_model(str(out), dtype="bfloat16")
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    ids = torch.randint(0, tokenizer.vocab_size, (2, 12))
    with torch.no_grad():  # the same model in half the bytes: logits close, not equal
        torch.testing.assert_close(bf16(ids).logits.float(), auto(ids).logits, atol=0.1, rtol=0.05)
    compiled, _ = load_model(str(out), compile=True)
    assert auto.decode_step == auto.step  # eager: the plain step
    assert compiled.decode_step != compiled.step  # the compiled step (compiles lazily, on its first call)
    with pytest.raises(ValueError, match="dtype must be auto or one of float32, bfloat16, float16, got 'int4'"):
        load_model(str(out), dtype="int4")


def random_biases(model: MiniGPT) -> MiniGPT:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(std=0.5)
    return model


def as_transformers_saves_it(folder, shards: int = 2):
    """The folder as transformers writes a larger model: no minillm.json, the weights in shards with an index."""
    from safetensors.torch import save_file

    (folder / "minillm.json").unlink()
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i::shards]
        save_file({k: tensors[k] for k in part}, folder / file, metadata={"format": "pt"})
        weight_map |= {k: file for k in part}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def test_a_sharded_qwen2_folder_loads_with_its_q_k_v_biases(tokenizer, tmp_path):
    from minillm.rundir import weights_sha256

    torch.manual_seed(0)
    model = random_biases(MiniGPT(micro_config(tokenizer.vocab_size, attention_bias=True, rope_theta=1e6))).eval()
    out = save_pretrained(model, tokenizer, tmp_path / "qwen")
    config = json.loads((out / "config.json").read_text())
    assert (config["architectures"], config["model_type"], config["use_sliding_window"]) == (
        ["Qwen2ForCausalLM"],
        "qwen2",
        False,
    )
    tensors = load_file(out / "model.safetensors")
    assert "model.layers.1.self_attn.v_proj.bias" in tensors and "model.layers.1.self_attn.o_proj.bias" not in tensors
    as_transformers_saves_it(out)
    (out / "config.json").write_text(json.dumps(config | {"sliding_window": 32768}))  # as Qwen2.5 ships: unused
    loaded, _ = load_pretrained(out)
    assert loaded.config.attention_bias and loaded.config.rope_theta == 1e6
    same_logits(model, loaded, tokenizer.vocab_size)
    ids = torch.randint(0, tokenizer.vocab_size, (1, 8))
    with torch.no_grad():
        for name, p in loaded.named_parameters():
            if name.endswith(".bias"):
                p.zero_()
        assert not torch.allclose(model(ids).logits, loaded(ids).logits, atol=1e-3)  # the biases count
    sha = weights_sha256(out)
    shard = out / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes() + b" ")
    assert weights_sha256(out) != sha  # a changed shard is a changed model (resume and the report see it)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"use_sliding_window": True}, r"use_sliding_window=True is not supported"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, r"rope_scaling=.* is not supported"),
        ({"model_type": "mistral"}, r"model_type 'mistral' cannot be imported; supported: llama .*qwen2"),
        ({"num_experts": 8}, r"mixture-of-experts qwen2 folder cannot be imported"),
    ],
)
def test_a_qwen2_folder_we_would_compute_differently_is_refused_by_name(tokenizer, tmp_path, change, message):
    out = save_pretrained(MiniGPT(micro_config(tokenizer.vocab_size, attention_bias=True)), tokenizer, tmp_path / "q")
    as_transformers_saves_it(out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(config | change))
    with pytest.raises(ValueError, match=message):
        load_pretrained(out)


def test_an_index_naming_a_missing_shard_is_a_clear_error(tokenizer, tmp_path):
    out = as_transformers_saves_it(save_pretrained(MiniGPT(micro_config(tokenizer.vocab_size)), tokenizer, tmp_path))
    (out / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"names shards that are not in .*model-00001-of-00002.safetensors"):
        load_pretrained(out)


def test_a_model_id_opens_its_snapshot_in_the_local_hugging_face_cache(tokenizer, tmp_path, monkeypatch):
    """`init_from=org/name` (and every model_path) finds the snapshot transformers' download left in the cache,
    offline; an id that is not there says where it looked and how to fetch it."""
    from huggingface_hub import constants

    from minillm.pretrained import find_model
    from minillm.rundir import resolve_init

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # what $HF_HUB_CACHE sets
    repo = cache / "models--HuggingFaceTB--SmolLM2-135M-Instruct"
    snapshot = repo / "snapshots" / "0123abcd"
    torch.manual_seed(0)
    model = MiniGPT(micro_config(tokenizer.vocab_size, tie_embeddings=False)).eval()
    as_transformers_saves_it(save_pretrained(model, tokenizer, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.chdir(tmp_path)  # no folder of that name here
    assert find_model("HuggingFaceTB/SmolLM2-135M-Instruct") == snapshot
    assert resolve_init("HuggingFaceTB/SmolLM2-135M-Instruct", "pretrain", "tiny") == snapshot
    loaded, _ = load_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    same_logits(model, loaded, tokenizer.vocab_size)
    with pytest.raises(FileNotFoundError, match=rf"Qwen/Qwen2.5-0.5B is not in the local cache {cache}.*hf download"):
        resolve_init("Qwen/Qwen2.5-0.5B", "pretrain", "tiny")
    with pytest.raises(FileNotFoundError, match="no model at absent/deeper/path"):
        load_model("absent/deeper/path")
