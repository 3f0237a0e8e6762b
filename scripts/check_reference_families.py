# Checks, on the CPU here, the model construction of scripts/device/reference_qlora_families.py for issue 10's four
# shapes, so that nothing about it is left to debug on the GPU machine:
#   1. each table entry builds its transformers config and model class the way run() does, and at full size (on the
#      meta device) has the parameter count of the published model (the numbers our FamilyArchitectureTests assert);
#   2. a narrowed copy (2 layers, a sliding and a global one, vocabulary 512, window 16) goes through what run() does
#      after quantization: prepare_model_for_kbit_training, LoRA on TARGETS (seven modules a layer, Phi-3's fused four),
#      then a forward with labels over 48 tokens (past the window) and a backward that reaches every LoRA B.
# Usage: python -m zipfile -e ../shared/bench/bitsandbytes-0.50.2-cuda130-slim.zip /tmp/bnb
#        PYTHONPATH=/tmp/bnb /work/pyenv/bin/python scripts/check_reference_families.py [NAME ...]
import os, sys
import torch
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "device"))
import reference_qlora_families as ref
from transformers import AutoConfig, MODEL_FOR_CAUSAL_LM_MAPPING
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

# transformers 5.25's count of each published model (tied embeddings once); phi-4-mini's as its checkpoint holds.
PUBLISHED = {"qwen3-8b": 8_190_735_360, "gemma-2-9b": 9_241_705_984, "gemma-3-12b": 11_766_034_176, "phi-4-mini": 3_836_021_760}
EXPECTED = {  # (class, attention implementation, LoRA modules per layer, layer types of the full model or None)
    "qwen3-8b": ("Qwen3ForCausalLM", "sdpa", 7, ["full_attention"] * 36),
    "gemma-2-9b": ("Gemma2ForCausalLM", "eager", 7, ["sliding_attention", "full_attention"] * 21),
    "gemma-3-12b": ("Gemma3ForCausalLM", "sdpa", 7, (["sliding_attention"] * 5 + ["full_attention"]) * 8),
    "phi-4-mini": ("Phi3ForCausalLM", "sdpa", 4, None),
}


def build(name, overrides, device):
    """The statements of run() that make the config and the model, with `overrides` on the table's fields."""
    c = dict(ref.CONFIGS[name]); c.pop("batch"); c.pop("seq")
    c.update(overrides)
    model_type, attn = c.pop("model_type", "llama"), c.pop("attn_implementation", "sdpa")
    cfg = AutoConfig.for_model(model_type, **{"max_position_embeddings": 8192, "rms_norm_eps": 1e-5, **c})
    cfg._attn_implementation = attn
    with torch.device(device):
        model = MODEL_FOR_CAUSAL_LM_MAPPING[type(cfg)](cfg)
    return cfg, model, c


failures = []


def check(ok, what):
    print(("ok    " if ok else "FAIL  ") + what, flush=True)
    if not ok:
        failures.append(what)


for name in sys.argv[1:] or list(EXPECTED):
    cls, attn, per_layer, layer_types = EXPECTED[name]
    cfg, model, c = build(name, {}, "meta")
    check(type(model).__name__ == cls, f"{name}: {type(model).__name__} (expected {cls})")
    check(cfg._attn_implementation == attn, f"{name}: attention {cfg._attn_implementation} (expected {attn})")
    count = sum(p.numel() for p in model.parameters())
    check(count == PUBLISHED[name], f"{name}: {count:,} parameters (published model: {PUBLISHED[name]:,})")
    if layer_types is not None:
        check(list(cfg.layer_types) == layer_types, f"{name}: layer_types {cfg.layer_types[:6]}...")
    lin, head = ref.params(c)
    check(lin > 0 and head == c["vocab_size"] * c["hidden_size"], f"{name}: FLOP count's parameters {lin:,} + head {head:,}")
    del model

    # Narrowed: two layers, a sliding one then a global one (Gemma 3's pattern of 2; the others by their defaults).
    narrow = dict(num_hidden_layers=2, vocab_size=512, sliding_window=16, pad_token_id=0)
    if name == "gemma-3-12b":
        narrow["sliding_window_pattern"] = 2
    torch.manual_seed(0)
    cfg, model, c = build(name, narrow, "cpu")
    model = model.to(torch.bfloat16)
    model.is_loaded_in_4bit = True
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    lcfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", target_modules=ref.TARGETS)
    model = get_peft_model(model, lcfg)
    model.train()
    lora_b = [(n, p) for n, p in model.named_parameters() if "lora_B" in n]
    check(len(lora_b) == 2 * per_layer, f"{name}: {len(lora_b)} LoRA modules on 2 layers (expected {2 * per_layer})")
    for _, p in lora_b:  # non-zero B, so that the gradient of every A flows too
        torch.nn.init.normal_(p, std=0.02)
    ids = torch.randint(0, 512, (2, 48))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    check(bool(torch.isfinite(loss)), f"{name}: loss {loss.item():.4f} over 2 x 48 tokens (window 16)")
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all()
                                                                               or p.grad.abs().sum() == 0)]
    check(not missing, f"{name}: every LoRA parameter has a finite non-zero gradient" + (f" (not: {missing[:3]})" if missing else ""))
    del model

print(f"{len(failures)} failure(s)" if failures else "all checks passed")
sys.exit(1 if failures else 0)
