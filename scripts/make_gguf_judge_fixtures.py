#!/usr/bin/env python3
"""Make what scripts/check_gguf_llamacpp.py's `families` part judges llama.cpp against: for each tiny model of
Tests/Fixtures/gguf-families/ (Qwen3, Gemma 2, Gemma 3, Phi-3; their values are all ones llama.cpp's architectures
can express: Gemma's query_pre_attn_scalar equal to head_dim, Gemma 3's local RoPE base 10000, windows of 16) a PEFT
LoRA adapter and transformers' logits.

  <family>-adapter/          adapter_config.json, adapter_model.safetensors: PEFT LoRA r=4, alpha 8 on every linear of
                             the text model (Phi-3's fused qkv_proj and gate_up_proj whole), B drawn N(0, 0.1) so that
                             it changes the output
  <family>-judge.safetensors input_ids [1, n] (n = 32, longer than the windows of 16; Phi-3: 72, longer than its
                             original_max_position_embeddings 64, so that transformers takes the long RoPE factors as
                             llama.cpp does: llama.cpp picks them by its context size, which is at least 64 in the judge),
                             logits_base [n, 96] of the bf16 model computed in fp32 with eager attention, logits_lora
                             [n, 96] with the adapter (eval mode)

Needs torch, transformers 5, peft. Run from the repository root: python3 scripts/make_gguf_judge_fixtures.py
"""
import os

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

OUT = "Tests/Fixtures/gguf-families"
TARGETS = {"phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]}
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main():
    for i, family in enumerate(["qwen3", "gemma2", "gemma3", "phi3"]):
        torch.manual_seed(100 + i)
        folder = os.path.join(OUT, family)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, attn_implementation="eager").float().eval()
        ids = torch.randint(4, model.config.vocab_size, (1, 72 if family == "phi3" else 32))
        with torch.no_grad():
            base = model(ids).logits[0]
        config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS.get(family, LINEARS), task_type="CAUSAL_LM")
        peft = get_peft_model(model, config)
        with torch.no_grad():
            for name, p in peft.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn_like(p) * 0.1)
        peft.eval()
        with torch.no_grad():
            lora = peft(ids).logits[0]
        peft.save_pretrained(os.path.join(OUT, f"{family}-adapter"))
        save_file({"input_ids": ids.contiguous(), "logits_base": base.contiguous(), "logits_lora": lora.contiguous()},
                  os.path.join(OUT, f"{family}-judge.safetensors"))
        print(family, "adapter changes the logits by up to", float((lora - base).abs().max()))


if __name__ == "__main__":
    main()
