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


def test_readme_fine_tuning_commands_compose():
    """Every `minillm train` line of the README's Hugging Face section is a valid command line (keys and values
    pass the schema); the models themselves are not downloaded here."""
    from minillm.config import compose, to_config

    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Fine-tune a Hugging Face model") :]
    (block,) = re.findall(r"```bash\n(.*?)```", section, re.S)[:1]
    commands = [c for c in re.sub(r"\\\n\s*", "", block).splitlines() if c.startswith("minillm train")]
    assert len(commands) == 3
    for command in commands:
        args = command.split("#")[0].split()[2:]
        config = to_config(compose(args))
        assert config.init_from and config.stage.name in ("sft", "dpo")
