import re
from pathlib import Path

import torch

from minillm.model import MiniGPT
from minillm.pretrained import save_pretrained
from tests.conftest import micro_config

README = Path(__file__).parents[1] / "README.md"


def test_readme_generate_example_runs(tokenizer, tmp_path, capsys):
    (block,) = [
        b for b in re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S) if "load_model(" in b
    ]
    torch.manual_seed(0)
    folder = save_pretrained(MiniGPT(micro_config(tokenizer.vocab_size)), tokenizer, tmp_path / "m")
    assert '"outputs/sft_tiny/final"' in block
    code = block.replace('"outputs/sft_tiny/final"', repr(str(folder)))
    namespace = {}
    exec(compile(code, str(README), "exec"), namespace)
    out, ids = namespace["output_ids"], namespace["prompt_ids"]
    assert out.shape[0] == 1 and len(ids) < out.shape[1] <= 40
    assert out[0, : len(ids)].tolist() == ids
    assert capsys.readouterr().out.count("\n") >= 5
