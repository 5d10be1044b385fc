"""GGUF export (minillm/gguf_writer.py): the file's metadata and tensors (read back with the gguf package), and
the proof by llama.cpp itself (ref extra): same token ids, same logits, same greedy continuation."""

import numpy as np
import pytest
import torch

from minillm.export import main as export_main
from minillm.gguf_writer import interleave_rope_rows, write_gguf
from minillm.model import MiniGPT, apply_rope, rope_tables
from minillm.pretrained import save_pretrained
from minillm.tokenizer import apply_chat_template
from tests.conftest import micro_config

TEXTS = ["To be, or not to be: that is the question.", "中共中央总书记 你好！", "emoji 😀 and  two spaces\tand\nlines"]


def test_interleaving_rows_turns_rotate_half_into_llama_cpps_pairwise_rotation():
    torch.manual_seed(0)
    heads, D, C = 2, 8, 5
    w = torch.randn(heads * D, C)
    x = torch.randn(C)
    cos, sin = rope_tables(D, torch.tensor([3]), 10000.0)  # position 3
    ours = apply_rope((w @ x).view(1, heads, 1, D), cos, sin).flatten()  # rotate-half on our rows
    q = (interleave_rope_rows(w, heads) @ x).view(heads, D // 2, 2)  # llama.cpp: rotate (q0, q1), (q2, q3), ...
    theta = 3 * 10000.0 ** (-torch.arange(0, D, 2).float() / D)
    a, b = q[..., 0], q[..., 1]
    pairs = torch.stack([a * theta.cos() - b * theta.sin(), a * theta.sin() + b * theta.cos()], -1)
    back = torch.cat([pairs[..., 0], pairs[..., 1]], -1).flatten()  # to rotate-half order to compare
    torch.testing.assert_close(back, ours, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", ["f32", "q8_0"])
def test_the_file_holds_the_architecture_the_vocabulary_and_every_tensor(tokenizer, tmp_path, dtype):
    import gguf

    torch.manual_seed(0)
    model = MiniGPT(micro_config(tokenizer.vocab_size, tie_embeddings=False))
    path = write_gguf(model, tokenizer, tmp_path / "m.gguf", dtype)
    reader = gguf.GGUFReader(path)
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert field("general.architecture") == "llama"
    assert field("llama.block_count") == 2 and field("llama.attention.head_count_kv") == 2
    assert field("tokenizer.ggml.model") == "llama" and field("tokenizer.ggml.add_space_prefix") is False
    assert field("tokenizer.ggml.eos_token_id") == tokenizer.eos_id
    assert field("tokenizer.ggml.eot_token_id") == tokenizer.im_end_id
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == tokenizer.vocab_size and tokens[tokenizer.im_start_id] == "<|im_start|>"
    types = field("tokenizer.ggml.token_type")
    assert types[tokenizer.im_end_id] == gguf.TokenType.CONTROL and gguf.TokenType.BYTE in types
    assert "<|im_start|>" in field("tokenizer.chat_template")
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 3 + 2 * 9  # embeddings, final norm, head; 9 per block
    assert tensors["blk.1.ffn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32  # norms stay f32
    wanted = gguf.GGMLQuantizationType.F32 if dtype == "f32" else gguf.GGMLQuantizationType.Q8_0
    assert tensors["blk.0.attn_v.weight"].tensor_type == wanted
    if dtype == "f32":
        v = np.asarray(tensors["blk.0.attn_v.weight"].data)
        assert np.array_equal(v, model.layers[0].self_attn.v_proj.weight.detach().numpy())
        q = np.asarray(tensors["blk.0.attn_q.weight"].data)
        expected = interleave_rope_rows(model.layers[0].self_attn.q_proj.weight.detach(), 4).numpy()
        assert np.array_equal(q, expected) and not np.array_equal(
            q, model.layers[0].self_attn.q_proj.weight.detach().numpy()
        )


def test_moe_and_reward_models_are_refused_with_the_reason(tokenizer, tmp_path, capsys):
    from minillm.model import RewardModel

    moe = MiniGPT(micro_config(tokenizer.vocab_size, n_experts=4))
    with pytest.raises(ValueError, match="mixture-of-experts model is not supported"):
        write_gguf(moe, tokenizer, tmp_path / "moe.gguf")
    biased = MiniGPT(micro_config(tokenizer.vocab_size, attention_bias=True))
    with pytest.raises(ValueError, match=r"q/k/v biases \(the Qwen2 layout\) is not supported"):
        write_gguf(biased, tokenizer, tmp_path / "qwen2.gguf")
    reward = save_pretrained(RewardModel(micro_config(tokenizer.vocab_size)), tokenizer, tmp_path / "rm")
    with pytest.raises(SystemExit):
        export_main([f"model_path={reward}", f"out={tmp_path / 'rm.gguf'}", "format=gguf"])
    assert "is a reward model" in capsys.readouterr().err
    with pytest.raises((SystemExit, ValueError), match="gguf.type must be one of f32, f16, bf16, q8_0"):
        export_main([f"model_path={reward}", f"out={tmp_path / 'x.gguf'}", "format=gguf", "gguf.type=q4"])


def test_gguf_into_an_existing_file_without_the_suffix_is_named(tokenizer, tmp_path, capsys):
    model = save_pretrained(MiniGPT(micro_config(tokenizer.vocab_size)), tokenizer, tmp_path / "m")
    (tmp_path / "notes").write_text("mine")
    with pytest.raises(SystemExit):
        export_main([f"model_path={model}", f"out={tmp_path / 'notes'}", "format=gguf"])
    err = capsys.readouterr().err
    assert f"out={tmp_path / 'notes'} is an existing file, not a .gguf path or a folder" in err and "notes.gguf" in err
    assert (tmp_path / "notes").read_text() == "mine"


@pytest.mark.ref
@pytest.mark.parametrize("tie", [True, False])
def test_llama_cpp_reads_our_ids_logits_and_greedy_continuation(pretrained, tmp_path, tie):
    import llama_cpp  # the ref venv has it: a missing one fails, never skips

    from minillm.generate import GenerationConfig, generate_ids, load_model

    model, tokenizer = load_model(str(pretrained))
    if not tie:  # an untied head: llama.cpp reads output.weight
        torch.manual_seed(0)
        untied = MiniGPT(micro_config(tokenizer.vocab_size, tie_embeddings=False, block_size=32)).eval()
        model = untied
    path = write_gguf(model, tokenizer, tmp_path / "m.gguf", "f32")
    llm = llama_cpp.Llama(str(path), n_ctx=model.config.block_size, n_threads=2, logits_all=True, verbose=False)
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tokenizer.encode(text), text
    chat = apply_chat_template(tokenizer, [{"role": "user", "content": "What is 2 + 3?"}], True).ids
    rendered = "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    assert llm.tokenize(rendered.encode(), add_bos=False, special=True) == chat

    ids = tokenizer.encode(TEXTS[0])[:20]
    llm.reset()
    llm.eval(ids)
    theirs = np.asarray(llm.scores[: len(ids)])
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-3, rtol=0)

    prompt = ids[:6]
    ours_new = generate_ids(
        model,
        tokenizer,
        torch.tensor([prompt]),
        torch.ones(1, len(prompt), dtype=torch.long),
        GenerationConfig(do_sample=False, max_new_tokens=10),
    )[0]
    llm.reset()
    theirs_new = []
    for token in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0):
        if token in (tokenizer.eos_id, tokenizer.im_end_id) or len(theirs_new) == 10:
            break
        theirs_new.append(token)
    assert theirs_new == [t for t in ours_new if t not in (tokenizer.eos_id, tokenizer.im_end_id)]
