"""Makes Tests/Fixtures/tiny-qwen2: a random Qwen2 (q/k/v biases, GQA, tied embeddings) saved by transformers,
and its fp32 logits on a few ids, so the CPU forward is checked on the qwen2 variant of the architecture.
Needs torch and transformers (CPU). Run from the repository root: python3 scripts/make_qwen2_fixture.py
"""
import torch
from safetensors.torch import save_file
from transformers import Qwen2Config, Qwen2ForCausalLM

torch.manual_seed(0)
config = Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=128, rope_theta=1000000.0, rms_norm_eps=1e-6,
                     tie_word_embeddings=True)
model = Qwen2ForCausalLM(config).eval()
with torch.no_grad():
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.normal_(0, 0.5)  # make a missing bias show
model.save_pretrained("Tests/Fixtures/tiny-qwen2", safe_serialization=True)
ids = torch.tensor([[5, 17, 250, 3, 99, 42, 7, 128, 64, 1, 200, 11]])
with torch.no_grad():
    logits = model(ids).logits
save_file({"input_ids": ids, "logits": logits.contiguous()}, "Tests/Fixtures/tiny-qwen2/expected.safetensors")
