"""Makes Tests/Fixtures/families/phi3/ and phi3-longrope/: tiny random Phi-3 models (model_type phi3) saved by
transformers 5, a PEFT LoRA adapter on the fused modules, and what transformers + PEFT compute with them.

What each fixture exercises (each would fail if the variation were left out):
  phi3/          fused qkv_proj ([q | k | v] rows) and gate_up_proj ([gate | up] rows), head_dim 24 (not a power of two),
                 partial_rotary_factor 0.75 (18 of 24 dims rotated), GQA 3:1, perturbed norms, untied head;
                 `window.*`: the same model and adapter with sliding_window 10 on 24-token rows.
  phi3-longrope/ the same shape with longrope scaling (short/long factors, original_max_position_embeddings 16,
                 max_position_embeddings 64: attention factor sqrt(1 + ln 4 / ln 16)), tied embeddings as Phi-4-mini;
                 `short.*` on 12-token rows (short factors), `long.*` on 24-token rows (long factors), greedy generation
                 from a 10-token prompt to 24 tokens (transformers drops the cache and recomputes it with the long
                 factors when the sequence first passes 16 tokens).

Files per fixture: base/ (config.json, model.safetensors in bf16), adapter/ (PEFT: r 8, alpha 16, the four modules,
A and B random), merged.safetensors (PEFT merge_and_unload of adapter/ into base/ in fp32, the block linears saved in
bf16), expected.safetensors:
  <set>.input_ids [rows, T] (int64), <set>.labels (-100 where ignored)
  <set>.logits_base: fp32 logits of base/ (bf16 values upcast) without the adapter; <set>.logits_lora: with adapter/
  <set>.loss: the mean cross-entropy (transformers' shifted labels) with the adapter, train mode, no dropout
  <set>.grad.<PEFT key>: its gradient for every lora_A / lora_B
  greedy.prompt, greedy.tokens: generate(do_sample=False) with the adapter through the KV cache (longrope only; phi3
  has greedy.* too)
Run from the repository root: /work/pyenv/bin/python scripts/make_phi3_fixture.py
"""
import json
import os
import shutil

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import Phi3Config, Phi3ForCausalLM

ROOT = "Tests/Fixtures/families"


def tiny_config(**extra):
    fields = dict(vocab_size=128, hidden_size=72, intermediate_size=64, num_hidden_layers=2, num_attention_heads=3,
                  num_key_value_heads=1, max_position_embeddings=64, original_max_position_embeddings=64,
                  partial_rotary_factor=0.75, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                  initializer_range=0.08, tie_word_embeddings=False)
    fields.update(extra)
    return Phi3Config(**fields)


def make(name, config, sets, greedy):
    out = os.path.join(ROOT, name)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    torch.manual_seed(0)
    model = Phi3ForCausalLM(config)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))  # a missing or misplaced norm shows
            # The saved base is bf16: compute with exactly the values saved.
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
    model.to(torch.bfloat16).save_pretrained(os.path.join(out, "base"), safe_serialization=True)
    model = Phi3ForCausalLM.from_pretrained(os.path.join(out, "base"), dtype=torch.float32)

    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["qkv_proj", "gate_up_proj", "o_proj", "down_proj"])
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():
        for pname, p in peft_model.named_parameters():
            if "lora_A" in pname or "lora_B" in pname:
                p.copy_(0.1 * torch.randn_like(p))
    peft_model.save_pretrained(os.path.join(out, "adapter"))
    os.remove(os.path.join(out, "adapter", "README.md"))  # PEFT's model card template: nothing a test reads

    expected = {}
    for set_name, (ids, labels, set_config) in sets.items():
        # A set may change config fields that hold no weights (sliding_window): same weights, same adapter.
        for key, value in set_config.items():
            setattr(model.config, key, value)
        ids = torch.tensor(ids)
        labels = torch.tensor(labels)
        expected[f"{set_name}.input_ids"] = ids
        expected[f"{set_name}.labels"] = labels
        peft_model.eval()
        with torch.no_grad():
            expected[f"{set_name}.logits_lora"] = peft_model(ids).logits.contiguous()
            with peft_model.disable_adapter():
                expected[f"{set_name}.logits_base"] = peft_model(ids).logits.contiguous()
        peft_model.train()
        peft_model.zero_grad()
        loss = peft_model(ids, labels=labels).loss
        loss.backward()
        expected[f"{set_name}.loss"] = loss.detach().reshape(1)
        for pname, p in peft_model.named_parameters():
            if p.grad is not None:
                key = pname.replace(".default.weight", ".weight")
                expected[f"{set_name}.grad.{key}"] = p.grad.detach().clone().contiguous()
        for key in set_config:
            setattr(model.config, key, getattr(config, key))
        peft_model.zero_grad()

    peft_model.eval()
    prompt, new_tokens = greedy
    with torch.no_grad():
        generated = peft_model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False,
                                        eos_token_id=None, pad_token_id=0)
    expected["greedy.prompt"] = torch.tensor(prompt)
    expected["greedy.tokens"] = generated[0, len(prompt):].contiguous()
    save_file(expected, os.path.join(out, "expected.safetensors"))

    merged = peft_model.merge_and_unload()
    save_file({n: p.detach().to(torch.bfloat16).contiguous() for n, p in merged.named_parameters() if ".layers." in n and "proj" in n},
              os.path.join(out, "merged.safetensors"))
    print(name, "loss", {k: float(v) for k, v in expected.items() if k.endswith(".loss")},
          "greedy", expected["greedy.tokens"].tolist())


def rows(seed, count, length):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (count, length), generator=g).tolist()


def masked(ids, first=7, last=3):
    labels = [list(r) for r in ids]
    labels[0][:first] = [-100] * first
    if len(labels) > 1:
        labels[1][-last:] = [-100] * last
    return labels


ids24 = rows(1, 2, 24)
make("phi3", tiny_config(),
     {"main": (ids24, masked(ids24), {}),
      "window": (ids24, masked(ids24), {"sliding_window": 10})},
     (rows(2, 1, 10)[0], 14))

short_factor = [1.0, 1.1, 1.25, 1.5, 1.8, 2.2, 2.7, 3.3, 4.0]
long_factor = [1.0, 1.5, 2.3, 3.5, 5.0, 7.0, 9.5, 12.0, 16.0]
ids12 = rows(3, 2, 12)
make("phi3-longrope",
     tiny_config(original_max_position_embeddings=16, max_position_embeddings=64, tie_word_embeddings=True,
                 rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": short_factor,
                                  "long_factor": long_factor}),
     {"short": (ids12, masked(ids12), {}),
      "long": (ids24, masked(ids24), {})},
     (rows(2, 1, 10)[0], 14))
