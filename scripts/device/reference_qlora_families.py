# Anchor benchmark: the seeds' stack (transformers + PEFT + bitsandbytes) doing QLoRA SFT steps.
# Random weights of a real architecture (speed does not depend on values), NF4 + double quant,
# LoRA on all seven projections, gradient checkpointing, paged 8-bit AdamW, bf16 autocast,
# prepare_model_for_kbit_training as the seeds do. Prints one JSON line per workload.
# Usage: python3 hf_qlora_bench.py NAME[,NAME...] [--steps 5] [--warmup 2]
import json, sys, time, argparse
import torch, torch.nn as nn
import bitsandbytes as bnb
from transformers import LlamaConfig, LlamaForCausalLM, AutoConfig, MODEL_FOR_CAUSAL_LM_MAPPING
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

CONFIGS = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=1e5,
                         head_dim=64, batch=4, seq=2048),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=5e5,
                         head_dim=64, batch=4, seq=2048),
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False, rope_theta=1e4,
                       head_dim=128, batch=2, seq=2048),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=5e5,
                         head_dim=128, batch=2, seq=2048),
    # Issue 10's families: each published config.json's fields (model_type picks transformers' class), at DESIGN.md's
    # 8B-class batch. Qwen/Qwen3-8B:
    "qwen3-8b": dict(model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=151936, tie_word_embeddings=False, rope_theta=1e6, head_dim=128,
                     rms_norm_eps=1e-6, max_position_embeddings=40960, sliding_window=None, use_sliding_window=False,
                     max_window_layers=36, batch=2, seq=2048),
    # google/gemma-2-9b (layer_types by Gemma2Config's default: even layers slide). Gemma 2 has no SDPA in transformers
    # (its soft-capping), so eager attention, as from_pretrained picks for it.
    "gemma-2-9b": dict(model_type="gemma2", hidden_size=3584, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16,
                       num_key_value_heads=8, vocab_size=256000, tie_word_embeddings=True, rope_theta=1e4, head_dim=256,
                       rms_norm_eps=1e-6, max_position_embeddings=8192, query_pre_attn_scalar=256, sliding_window=4096,
                       attn_logit_softcapping=50.0, final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh",
                       attn_implementation="eager", batch=2, seq=2048),
    # google/gemma-3-12b-pt's text_config (the text model; the rest are Gemma3TextConfig's defaults: vocabulary 262208,
    # head_dim 256, query_pre_attn_scalar 256, global base 1e6, local base 1e4, every 6th layer global, tied).
    "gemma-3-12b": dict(model_type="gemma3_text", hidden_size=3840, intermediate_size=15360, num_hidden_layers=48,
                        num_attention_heads=16, num_key_value_heads=8, vocab_size=262208, tie_word_embeddings=True,
                        rope_theta=1e6, rope_local_base_freq=1e4, rope_scaling=dict(rope_type="linear", factor=8.0), head_dim=256,
                        rms_norm_eps=1e-6, max_position_embeddings=131072, query_pre_attn_scalar=256, sliding_window=1024,
                        batch=2, seq=2048),
    # microsoft/Phi-4-mini-instruct (fused qkv_proj / gate_up_proj, 96 of 128 dims rotated, longrope).
    "phi-4-mini": dict(model_type="phi3", hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=24,
                       num_key_value_heads=8, vocab_size=200064, tie_word_embeddings=True, rope_theta=1e4, head_dim=128,
                       rms_norm_eps=1e-5, max_position_embeddings=131072, original_max_position_embeddings=4096,
                       partial_rotary_factor=0.75, sliding_window=262144, resid_pdrop=0.0,
                       rope_scaling=dict(type="longrope", short_factor=[1.0] * 48, long_factor=[
                           1, 1.118320672, 1.250641126, 1.398617824, 1.564103225, 1.74916897, 1.956131817, 2.187582649,
                           2.446418898, 2.735880826, 3.059592084, 3.421605075, 3.826451687, 4.279200023, 4.785517845,
                           5.351743533, 5.984965424, 6.693110555, 7.485043894, 8.370679318, 9.36110372, 10.4687158,
                           11.70738129, 13.09260651, 14.64173252, 16.37415215, 18.31155283, 20.47818807, 22.90118105,
                           25.61086418, 28.64115884, 32.03, 32.1, 32.13, 32.23, 32.6, 32.61, 32.64, 32.66, 32.7, 32.71,
                           32.93, 32.97, 33.28, 33.49, 33.5, 44.16, 47.77]),
                       batch=2, seq=2048),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj"]


def quantize_linears(model):
    for name, mod in list(model.named_modules()):
        for cname, child in list(mod.named_children()):
            if isinstance(child, nn.Linear) and cname in TARGETS:
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False,
                                      compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")
                q.weight = bnb.nn.Params4bit(child.weight.data.to("cpu"), requires_grad=False,
                                             compress_statistics=True, quant_type="nf4").to("cuda")
                setattr(mod, cname, q)
    torch.cuda.empty_cache()


def params(c):
    h, i, L, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    kv = c["num_key_value_heads"] * c["head_dim"]
    qo = c["num_attention_heads"] * c["head_dim"]
    per = h * qo * 2 + h * kv * 2 + 3 * h * i
    return per * L, v * h  # linear params in blocks, lm_head params


def run(name, steps, warmup, r):
    c = dict(CONFIGS[name]); batch, seq = c.pop("batch"), c.pop("seq")
    model_type, attn = c.pop("model_type", "llama"), c.pop("attn_implementation", "sdpa")
    cfg = AutoConfig.for_model(model_type, **{"max_position_embeddings": 8192, "rms_norm_eps": 1e-5, **c})
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = MODEL_FOR_CAUSAL_LM_MAPPING[type(cfg)](cfg).to(torch.bfloat16)
    quantize_linears(model)
    try:
        model.is_loaded_in_4bit = True  # as from_pretrained(quantization_config=...) would mark it
    except Exception:
        pass
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    if not model.is_gradient_checkpointing:  # replicate what prepare_model_for_kbit_training does for a 4-bit load
        for p in model.parameters():
            if p.dtype in (torch.float16, torch.bfloat16) and p.__class__.__name__ != "Params4bit":
                p.data = p.data.to(torch.float32)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.enable_input_require_grads()
    lcfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", target_modules=TARGETS)
    model = get_peft_model(model, lcfg)
    model.train()
    gc = bool(getattr(model.base_model.model, "is_gradient_checkpointing", False))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = bnb.optim.PagedAdamW8bit([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    torch.cuda.reset_peak_memory_stats()
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device="cuda")
    times = []
    for s in range(warmup + steps):
        torch.cuda.synchronize(); t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step(); opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize(); times.append(time.perf_counter() - t0)
    t = sorted(times[warmup:])[len(times[warmup:]) // 2]
    lin, head = params(c)
    toks = batch * seq
    # FLOPs a QLoRA step must do at least: forward 2N, backward input-grad 2N (frozen base), lm_head 2+2,
    # attention scores+values fwd 4*s*d per token per layer, bwd twice that.
    attn = 3 * 4 * seq * c["num_attention_heads"] * c["head_dim"] * c["num_hidden_layers"]
    flops = toks * (4 * lin + 4 * head + attn)
    out = dict(workload=name, impl="hf-peft-bnb", batch=batch, seq=seq, lora_r=r, trainable=trainable,
               step_s=round(t, 4), tokens_per_s=round(toks / t, 1), useful_tflops=round(flops / t / 1e12, 1),
               peak_alloc_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
               peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2), loss=round(loss.item(), 4), grad_ckpt=gc)
    print(json.dumps(out), flush=True)
    del model, opt; torch.cuda.empty_cache()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("names"); ap.add_argument("--steps", type=int, default=5); ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--r", type=int, default=16)
    a = ap.parse_args()
    a_ = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16); b_ = torch.randn_like(a_)
    for _ in range(3): a_ @ b_
    torch.cuda.synchronize(); t0 = time.perf_counter()
    for _ in range(10): a_ @ b_
    torch.cuda.synchronize(); dt = (time.perf_counter() - t0) / 10
    print(json.dumps(dict(ceiling_bf16_tflops=round(2 * 8192**3 / dt / 1e12, 1), device=torch.cuda.get_device_name())), flush=True)
    del a_, b_
    for n in a.names.split(","):
        try:
            run(n, a.steps, a.warmup, a.r)
        except Exception as e:
            print(json.dumps(dict(workload=n, error=repr(e)[:300])), flush=True)
