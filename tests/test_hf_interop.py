"""The exported folder is a Hugging Face Llama: transformers loads it and computes the same logits."""

import pytest
import torch

from minillm.model import MiniGPT
from minillm.pretrained import save_pretrained
from tests.conftest import micro_config

pytestmark = pytest.mark.ref


@pytest.mark.parametrize("tie", [True, False])
def test_transformers_llama_loads_the_export_with_equal_logits(tokenizer, tmp_path, tie):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = MiniGPT(micro_config(tokenizer.vocab_size, tie_embeddings=tie, rope_theta=5000.0)).eval()
    out = save_pretrained(model, tokenizer, tmp_path / "final")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager", dtype=torch.float32)
    hf.eval()
    ids = torch.tensor([tokenizer.encode("To be, or not to be, 你好！")])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits, atol=1e-4, rtol=0)
