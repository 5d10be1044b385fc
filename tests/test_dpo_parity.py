"""Our DPO loss and metrics equal TRL's DPOTrainer on the same weights and the same token ids (ref extra).

TRL tokenizes strings itself, so the test hands it a word-level tokenizer whose words are our token ids
("<17> <4> …"): both sides then see identical sequences. The policy is a perturbed copy of the reference — with
policy == reference every implementation logs ln 2 and zero rewards, which would prove nothing.
"""

import pytest
import torch

from minillm.data.kinds import encode_pair
from minillm.generate import load_model
from minillm.losses import dpo_loss, sequence_logprobs
from minillm.model import MiniGPT
from minillm.pretrained import save_pretrained
from tests.conftest import micro_config

pytestmark = pytest.mark.ref

PAIRS = [
    {"prompt": [{"role": "user", "content": "What is 2 + 3?"}], "chosen": "5", "rejected": "7"},
    {"prompt": [{"role": "user", "content": "Hello"}], "chosen": "Hi, friend.", "rejected": "Go away."},
    {
        "prompt": [{"role": "user", "content": "Reverse the words: apple moon"}],
        "chosen": "moon apple",
        "rejected": "apple moon",
    },
]


def id_tokenizer(vocab_size: int, eos: int, pad: int):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    inner = Tokenizer(WordLevel({f"<{i}>": i for i in range(vocab_size)}, unk_token="<1>"))
    inner.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=inner, eos_token=f"<{eos}>", pad_token=f"<{pad}>", unk_token="<1>")


def words(ids):
    return "".join(f"<{i}> " for i in ids)


# TRL's ipo averages the log-probs over tokens; ours is the paper's (summed). TRL 1.16's sigmoid ignores
# label_smoothing (its `robust` is rDPO, divided by 1 - 2ε): our conservative DPO has no TRL counterpart and is
# covered by a hand-computed test. docs/training.md says which losses match.
@pytest.mark.parametrize(("loss_type", "label_smoothing"), [("sigmoid", 0.0), ("hinge", 0.0)], ids=["sigmoid", "hinge"])
def test_dpo_matches_trl(tokenizer, tmp_path, loss_type, label_smoothing):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    sft = MiniGPT(micro_config(tokenizer.vocab_size, block_size=128))
    save_pretrained(sft, tokenizer, tmp_path / "sft")
    with torch.no_grad():
        for p in sft.parameters():
            p.add_(0.02 * torch.randn_like(p))
    save_pretrained(sft, tokenizer, tmp_path / "policy")

    rows = []
    for pair in PAIRS:
        enc = encode_pair(tokenizer, pair, (64, 32))
        prompt_len = len(enc["chosen_ids"]) - len([t for t in enc["chosen_labels"] if t != -100])
        prompt = enc["chosen_ids"][:prompt_len]
        rows.append(
            {
                "prompt": words(prompt),
                "chosen": words(enc["chosen_ids"][prompt_len:-1]),
                "rejected": words(enc["rejected_ids"][prompt_len:-1]),
                "enc": enc,
            }
        )

    # Ours: the same computation DPOModule does.
    policy, _ = load_model(str(tmp_path / "policy"))
    reference, _ = load_model(str(tmp_path / "sft"))
    beta = 0.2

    def logps(model, side):
        out = []
        for r in rows:
            ids, labels = torch.tensor([r["enc"][f"{side}_ids"]]), torch.tensor([r["enc"][f"{side}_labels"]])
            out.append(sequence_logprobs(model(ids[:, :-1]).logits, labels[:, 1:]))
        return torch.cat(out)

    with torch.no_grad():
        ours_loss, ours = dpo_loss(
            logps(policy, "chosen"),
            logps(policy, "rejected"),
            logps(reference, "chosen"),
            logps(reference, "rejected"),
            beta=beta,
            loss_type=loss_type,
            label_smoothing=label_smoothing,
        )

    # TRL, one logged step on the same pairs.
    hf_policy = AutoModelForCausalLM.from_pretrained(
        tmp_path / "policy", attn_implementation="eager", dtype=torch.float32
    )
    hf_reference = AutoModelForCausalLM.from_pretrained(
        tmp_path / "sft", attn_implementation="eager", dtype=torch.float32
    )
    args = DPOConfig(
        output_dir=str(tmp_path / "trl"),
        beta=beta,
        loss_type=[loss_type],
        label_smoothing=label_smoothing,
        max_steps=1,
        logging_steps=1,
        per_device_train_batch_size=len(rows),
        learning_rate=1e-6,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        max_length=None,
        dataloader_num_workers=0,
    )
    dataset = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    trainer = DPOTrainer(
        model=hf_policy,
        ref_model=hf_reference,
        args=args,
        train_dataset=dataset,
        processing_class=id_tokenizer(tokenizer.vocab_size, tokenizer.im_end_id, tokenizer.pad_id),
    )
    first = trainer.train_dataset[0]
    assert first["prompt_ids"] + first["chosen_ids"] == rows[0]["enc"]["chosen_ids"]  # identical sequences
    trainer.train()
    logged = trainer.state.log_history[0]
    assert logged["loss"] == pytest.approx(ours_loss.item(), abs=1e-5)
    for key, value in ours.items():
        assert logged[key] == pytest.approx(value.item(), abs=1e-5), key
