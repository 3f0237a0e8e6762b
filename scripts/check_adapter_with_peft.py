"""Checks that Hugging Face PEFT loads an adapter we trained and computes the same loss we do.

    python3 scripts/check_adapter_with_peft.py MODEL_DIR ADAPTER_DIR TEXTS.jsonl OUR_LOSS

TEXTS.jsonl holds {"text": ...} lines; OUR_LOSS is what `qlora eval --model MODEL_DIR --adapter ADAPTER_DIR
--data TEXTS.jsonl --json` printed (mean over all tokens, an EOS appended to each text, as our SFT data does).
Needs torch, transformers and peft (a CPU install is enough). Exits non-zero if the losses differ by more
than 1e-3 relative.
"""
import json
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

model_dir, adapter_dir, texts_path, our_loss = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
model = PeftModel.from_pretrained(model, adapter_dir)
model.eval()
total, count = 0.0, 0
with torch.no_grad():
    for line in open(texts_path):
        text = json.loads(line)["text"]
        ids = tokenizer(text, add_special_tokens=True).input_ids + [tokenizer.eos_token_id]
        x = torch.tensor([ids])
        logits = model(x).logits[0, :-1].float()
        losses = torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum")
        total += losses.item()
        count += len(ids) - 1
peft_loss = total / count
print(f"PEFT loss {peft_loss:.6f}, ours {our_loss:.6f}, relative difference {abs(peft_loss - our_loss) / peft_loss:.2e}")
sys.exit(0 if abs(peft_loss - our_loss) / peft_loss < 1e-3 else 1)
