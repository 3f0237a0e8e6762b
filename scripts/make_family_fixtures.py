"""Makes Tests/Fixtures/families/<family>/: per model family a tiny random model saved by transformers (bf16), a PEFT
LoRA adapter on every linear layer of its text model (B non-zero), and what the CPU reference must reproduce.

Every variation of the family matters on the fixture's sequences (24 tokens, longer than every sliding window; norm
weights perturbed so w vs 1 + w shows; caps small enough that soft-capping changes the loss; query_pre_attn_scalar
unlike head_dim; distinct RoPE bases per layer type). tests check that leaving any variation out fails.

  base/                  config.json, model.safetensors (bf16), as save_pretrained writes them
  adapter/               adapter_config.json, adapter_model.safetensors (PEFT, fp32)
  merged-bf16/           PEFT merge_and_unload() of adapter/ into the base (computed in fp32, saved bf16)
  expected.safetensors   input_ids [2,24] and labels (-100 on the first 5 of row 0 and the last 3 of row 1);
                         logits_base: the base's fp32 logits (bf16 weights upcast, eager attention);
                         logits_lora, loss_lora: with the adapter, train mode, no dropout; grad.<PEFT key>: d loss_lora / d
                         every lora_A and lora_B; prompt (row 0's first 4 ids) and generated: 16 greedy tokens after it with
                         the adapter and the KV cache (generation crosses every window).

Needs torch, transformers 5 and peft (CPU). Run from the repository root: python3 scripts/make_family_fixtures.py
"""
import json
import os
import shutil

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, Gemma3Config, Gemma3ForConditionalGeneration

ROOT = "Tests/Fixtures/families"
VOCAB, LENGTH, PROMPT, NEW_TOKENS = 128, 24, 4, 16
TEXT_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

COMMON = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=1, eos_token_id=2)

FAMILIES = {
    # q/k norms (w), head_dim independent of hidden / heads, untied head, sliding window on the layers from max_window_layers.
    "qwen3": dict(model_type="qwen3", num_hidden_layers=2, tie_word_embeddings=False, rope_theta=10000.0,
                  use_sliding_window=True, sliding_window=6, max_window_layers=1),
    # Sliding window on every layer.
    "mistral": dict(model_type="mistral", num_hidden_layers=2, tie_word_embeddings=False, rope_theta=10000.0, sliding_window=6),
    # (1 + w) and sandwich norms, GeGLU, √hidden, query_pre_attn_scalar, both soft-caps, alternating sliding/full, tied.
    "gemma2": dict(model_type="gemma2", num_hidden_layers=2, query_pre_attn_scalar=8, attn_logit_softcapping=2.0,
                   final_logit_softcapping=3.0, sliding_window=5, rope_theta=10000.0),
    # Gemma 2's block with q/k norms ((1 + w)), no caps, local and global layers with their own RoPE (global one scaled).
    "gemma3_text": dict(model_type="gemma3_text", num_hidden_layers=3, query_pre_attn_scalar=8, sliding_window=5,
                        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 100000.0},
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 10.0}}),
}


def make_model(family, spec):
    torch.manual_seed(sum(map(ord, family)))
    if family == "gemma3":
        text = dict(COMMON, **FAMILIES["gemma3_text"])
        text.pop("model_type")
        config = Gemma3Config(text_config=text, vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                                   num_attention_heads=2, image_size=28, patch_size=14),
                              mm_tokens_per_image=4, image_token_index=VOCAB - 1, boi_token_index=VOCAB - 3, eoi_token_index=VOCAB - 2,
                              tie_word_embeddings=True)
        model = Gemma3ForConditionalGeneration(config)
    else:
        from transformers import AutoConfig
        fields = dict(COMMON, **spec)
        config = AutoConfig.for_model(fields.pop("model_type"), **fields)
        model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vision_tower" in name or "multi_modal_projector" in name:
                continue
            if "gemma" in family and ("post_attention_layernorm" in name or "post_feedforward_layernorm" in name):
                # Gemma's sandwich norms scale the blocks' outputs up (1 + w ≈ 2.5), so that the tied head does not
                # just predict the current token from its own (√hidden-scaled) embedding.
                p.normal_(1.5, 0.3)
            elif "norm" in name:
                p.normal_(0.0, 0.3)  # far from both 0 and 1: w vs 1 + w, and every missing norm, shows
            elif "embed_tokens" in name or "lm_head" in name:
                # Gemma scales the embedding by √48 ≈ 6.9: a smaller std keeps the blocks' outputs in play.
                p.normal_(0.0, 0.3 if "gemma" in family else 1.0)
            else:
                p.normal_(0.0, 0.15)
    # bf16 weights, computed in fp32 as the CPU reference does.
    model = model.to(torch.bfloat16).to(torch.float32)
    model.config._attn_implementation = "eager"
    for sub in model.modules():
        if hasattr(sub, "config") and hasattr(sub.config, "_attn_implementation"):
            sub.config._attn_implementation = "eager"
    return model


def text_targets(model):
    """Full module paths of the text model's linear layers (a multimodal model's vision tower left alone)."""
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in TEXT_LINEARS
             and "vision_tower" not in n]
    return names


def forward(model, ids, family):
    kwargs = {"token_type_ids": torch.zeros_like(ids)} if family == "gemma3" else {}
    return model(input_ids=ids, **kwargs).logits


def causal_loss(logits, labels):
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1)
    return torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="mean")


def load(family, directory, dtype):
    """The saved checkpoint as a user loads it: fp32 (or fp64) compute, eager attention. (Gemma's √hidden buffer is
    then made in that dtype, not rounded through bf16 as a model cast with .to() would keep it.)"""
    cls = Gemma3ForConditionalGeneration if family == "gemma3" else AutoModelForCausalLM
    return cls.from_pretrained(directory, dtype=dtype, attn_implementation="eager")


def lora_run(family, model, ids, labels, targets, out=None):
    """Logits, loss and LoRA gradients with the adapter (made with seed 11 when `out` is given, else loaded from it)."""
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * 0.2)
    if out is not None:
        peft_model.save_pretrained(os.path.join(out, "adapter"))
        os.remove(os.path.join(out, "adapter", "README.md"))
    peft_model.train()
    logits = forward(peft_model, ids, family)
    loss = causal_loss(logits, labels)
    loss.backward()
    grads = {"grad." + n.replace(".default", ""): p.grad.detach().float().contiguous()
             for n, p in peft_model.named_parameters() if p.grad is not None and "lora_" in n}
    peft_model.zero_grad()
    return peft_model, logits.detach().float().contiguous(), loss.detach().float().reshape(1), grads


def make(family, spec):
    out = os.path.join(ROOT, family)
    shutil.rmtree(out, ignore_errors=True)
    made = make_model(family, spec)
    made.to(torch.bfloat16).save_pretrained(os.path.join(out, "base"), safe_serialization=True)
    for name in ("generation_config.json",):
        path = os.path.join(out, "base", name)
        if os.path.exists(path):
            os.remove(path)
    model = load(family, os.path.join(out, "base"), torch.float32).eval()

    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, VOCAB - 3, (2, LENGTH), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100
    labels[1, -3:] = -100
    with torch.no_grad():
        logits_base = forward(model, ids, family)

    targets = text_targets(model) if family == "gemma3" else "all-linear"
    peft_model, logits_lora, loss, grads = lora_run(family, model, ids, labels, targets, out)
    tensors = {"input_ids": ids, "labels": labels, "logits_base": logits_base.contiguous(),
               "logits_lora": logits_lora, "loss_lora": loss, **grads}
    # The same in float64: how far transformers' own fp32 run is from the exact values, for the README and the tests.
    _, logits64, loss64, grads64 = lora_run(family, load(family, os.path.join(out, "base"), torch.float64), ids, labels, targets)
    worst = max(((grads[k] - grads64[k]).norm() / grads64[k].norm()).item() for k in grads)
    print(f"{family}: fp32 vs fp64: logits {((logits_lora - logits64).norm() / logits64.norm()).item():.2e}, "
          f"loss {abs(loss - loss64).item() / loss64.item():.2e}, worst gradient {worst:.2e}")
    tensors.update({"logits_lora_fp64": logits64, "loss_lora_fp64": loss64})
    tensors.update({k.replace("grad.", "grad_fp64."): v for k, v in grads64.items()})

    peft_model.eval()
    prompt = ids[:1, :PROMPT]
    with torch.no_grad():
        kwargs = {"token_type_ids": torch.zeros_like(prompt)} if family == "gemma3" else {}
        generated = peft_model.generate(input_ids=prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                        eos_token_id=None, pad_token_id=0, **kwargs)
        # The same tokens by the full forward (no cache): a check that the cache computed what the mask says.
        check = prompt
        for _ in range(NEW_TOKENS):
            kw = {"token_type_ids": torch.zeros_like(check)} if family == "gemma3" else {}
            check = torch.cat([check, peft_model(input_ids=check, use_cache=False, **kw).logits[:, -1:].argmax(-1)], dim=1)
        assert torch.equal(generated, check), (generated, check)
    tensors["prompt"] = prompt[0].clone()
    tensors["generated"] = generated[0, PROMPT:].clone()
    save_file(tensors, os.path.join(out, "expected.safetensors"))

    merged = peft_model.merge_and_unload()
    merged.to(torch.bfloat16).save_pretrained(os.path.join(out, "merged-bf16"), safe_serialization=True)
    path = os.path.join(out, "merged-bf16", "generation_config.json")
    if os.path.exists(path):
        os.remove(path)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
    print(f"{family}: loss {loss.item():.6f}, generated {generated[0, PROMPT:].tolist()}, {size // 1024} KB")


if __name__ == "__main__":
    for family, spec in FAMILIES.items():
        make(family, spec)
    make("gemma3", None)
