"""The exported folder is a Hugging Face Llama: transformers loads it and computes the same logits."""

import pytest
import torch

from minillm.model import MiniGPT
from minillm.pretrained import save_pretrained
from tests.conftest import micro_config

pytestmark = pytest.mark.ref


@pytest.mark.parametrize("tie", [True, False])
def test_transformers_llama_loads_the_export_with_equal_logits(tokenizer, tmp_path, tie):
    import transformers  # the ref venv has it: a missing one fails, never skips

    torch.manual_seed(0)
    model = MiniGPT(micro_config(tokenizer.vocab_size, tie_embeddings=tie, rope_theta=5000.0)).eval()
    out = save_pretrained(model, tokenizer, tmp_path / "final")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager", dtype=torch.float32)
    hf.eval()
    ids = torch.tensor([tokenizer.encode("To be, or not to be, 你好！")])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits, atol=1e-4, rtol=0)


def test_export_cli_tokenizer_generation_and_round_trip(pretrained, tmp_path):
    import transformers  # the ref venv has it: a missing one fails, never skips

    from minillm.export import main
    from minillm.generate import GenerationConfig, generate_ids, load_model
    from minillm.tokenizer import apply_chat_template

    main([f"model_path={pretrained}", f"out={tmp_path / 'hf'}"])
    ours, tokenizer = load_model(str(pretrained))
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in ["To be, or not to be: that is the question.", "中共中央总书记 你好！", "  tabs\tand\nlines 😀"]:
        assert hf_tok.encode(text, add_special_tokens=False) == tokenizer.encode(text), text
    chat = [{"role": "user", "content": "What is 2 + 3?"}]
    rendered = hf_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    hf_ids = hf_tok.apply_chat_template(chat, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert list(hf_ids) == apply_chat_template(tokenizer, chat, add_generation_prompt=True).ids

    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", attn_implementation="eager", dtype=torch.float32
    ).eval()
    ids = torch.tensor([tokenizer.encode("To be, or not to be")])
    ours_new = generate_ids(
        ours, tokenizer, ids, torch.ones_like(ids), GenerationConfig(do_sample=False, max_new_tokens=12)
    )[0]
    with torch.no_grad():
        hf_out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    assert ours_new and (len(ours_new) == 12 or ours_new[-1] in (tokenizer.eos_id, tokenizer.im_end_id))
    assert hf_out[0, ids.shape[1] :].tolist() == ours_new  # the whole continuation, EOS included when produced

    hf.save_pretrained(tmp_path / "resaved")  # no minillm.json: imported from config.json
    (tmp_path / "resaved" / "tokenizer.model").write_bytes((tmp_path / "hf" / "tokenizer.model").read_bytes())
    back, back_tok = load_model(str(tmp_path / "resaved"))
    assert back_tok.encode("To be") == tokenizer.encode("To be")
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ours(ids).logits, atol=1e-5, rtol=0)


def test_a_reward_model_exports_as_sequence_classification(tokenizer, tmp_path):
    import transformers  # the ref venv has it: a missing one fails, never skips

    from minillm.model import RewardModel

    torch.manual_seed(0)
    model = RewardModel(micro_config(tokenizer.vocab_size)).eval()
    out = save_pretrained(model, tokenizer, tmp_path / "rm")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(
        out, attn_implementation="eager", dtype=torch.float32
    ).eval()
    ids = torch.tensor([tokenizer.encode("a reply to score")])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits[0, 0], model(ids)[0, -1], atol=1e-4, rtol=0)


def test_transformers_qwen2_loads_the_export_with_equal_logits(tokenizer, tmp_path):
    import transformers

    torch.manual_seed(0)
    model = MiniGPT(micro_config(tokenizer.vocab_size, attention_bias=True, rope_theta=1e6)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(std=0.5)
    out = save_pretrained(model, tokenizer, tmp_path / "final")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager", dtype=torch.float32)
    assert type(hf).__name__ == "Qwen2ForCausalLM"
    ids = torch.tensor([tokenizer.encode("To be, or not to be, 你好！")])
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(ids).logits, model(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_a_sharded_folder_transformers_wrote_loads_with_equal_logits(tokenizer, tmp_path, architecture):
    """A random model of each family saved by transformers itself (sharded, with an index; untied for Llama, tied
    for Qwen2 as Qwen2.5-0.5B ships), read by minillm without minillm.json: the same logits."""
    import transformers

    from minillm.pretrained import load_pretrained

    shape = dict(
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_theta=100000.0,
        rms_norm_eps=1e-6,
    )
    if architecture == "llama":
        config, cls = transformers.LlamaConfig(**shape, tie_word_embeddings=False), transformers.LlamaForCausalLM
    else:
        config = transformers.Qwen2Config(**shape, tie_word_embeddings=True, use_sliding_window=False)
        cls = transformers.Qwen2ForCausalLM
    torch.manual_seed(0)
    hf = cls(config).eval()
    if architecture == "qwen2":
        with torch.no_grad():
            for name, p in hf.named_parameters():
                if name.endswith(".bias"):
                    p.normal_(std=0.5)
    folder = tmp_path / architecture
    hf.save_pretrained(folder, max_shard_size="100KB")
    tokenizer.save(folder)  # the tokenizer.json backend is separate work: our sentencepiece model beside it
    assert (folder / "model.safetensors.index.json").is_file() and not (folder / "model.safetensors").exists()
    model, _ = load_pretrained(folder)
    assert model.config.attention_bias == (architecture == "qwen2") and model.config.rope_theta == 100000.0
    assert model.config.max_position_embeddings == 128
    ids = torch.tensor([tokenizer.encode("To be, or not to be, 你好！")])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("template", ["chatml", "zephyr"])
def test_a_tokenizer_json_folder_gives_transformers_ids_and_chat_template(tmp_path, template):
    """Our reading of a tokenizer.json folder (ids, the template's rendering with its special tokens) equals
    transformers' AutoTokenizer on the same folder."""
    import transformers

    from minillm.hf_tokenizer import open_tokenizer
    from minillm.tokenizer import apply_chat_template
    from tests.test_hf_tokenizer import CHATML, CONVERSATION, ZEPHYR, hf_tokenizer_folder

    source, eos = (CHATML, "<|im_end|>") if template == "chatml" else (ZEPHYR, "</s>")
    folder = hf_tokenizer_folder(tmp_path / template, source, eos=eos, extra=["<|user|>"])
    ours = open_tokenizer(folder)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    text = "To be, or not to be: 2 + 3 = 5. 你好！"
    assert ours.encode(text) == theirs.encode(text, add_special_tokens=False)
    for messages, prompt in ((CONVERSATION, False), (CONVERSATION[:2], True)):
        expected = theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=prompt)
        expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
        assert apply_chat_template(ours, messages, add_generation_prompt=prompt).ids == list(expected)
    assert ours.eos_id == theirs.eos_token_id
