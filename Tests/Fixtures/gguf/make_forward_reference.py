# Reference forward/generation of the converted SmolLM2 folder with transformers (fp32 compute on the bf16 weights).
#   python make_forward_reference.py <converted folder> smollm2-forward-reference.json <SmolLM2-135M-Instruct.Q4_1.gguf>
# Needs torch (CPU), transformers 5.23, accelerate, gguf. Also checks that every converted weight equals
# bf16(transformers' own load of the GGUF).
import os
import torch, json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
folder = sys.argv[1]
tok = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
refm = AutoModelForCausalLM.from_pretrained(os.path.dirname(sys.argv[3]), gguf_file=os.path.basename(sys.argv[3]), dtype=torch.float32)
sa, sb = model.state_dict(), refm.state_dict()
print('max |ours - bf16(transformers GGUF load)|:', max((sa[k] - sb[k].bfloat16().float()).abs().max().item() for k in sb))
msgs = [{"role": "user", "content": "What is 2+2?"}]
ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors='pt')
if not isinstance(ids, torch.Tensor): ids = ids['input_ids']
with torch.no_grad():
    logits = model(ids).logits[0]
last = logits[-1]
top = torch.topk(last, 20)
out = model.generate(ids, max_new_tokens=24, do_sample=False)
gen = out[0][ids.shape[1]:].tolist()
ref = {
  "note": "transformers 5.23 on the converted folder, fp32 compute (bf16 weights upcast), eager; prompt = chat template of [user: 'What is 2+2?'] with add_generation_prompt",
  "input_ids": ids[0].tolist(),
  "last_top20_ids": top.indices.tolist(),
  "last_top20_logits": [float(v) for v in top.values],
  "position_logit_sums": [float(v) for v in logits.double().sum(-1)],
  "position_logit_norms": [float(v) for v in logits.double().norm(dim=-1)],
  "greedy_ids": gen,
  "greedy_text": tok.decode(gen),
}
json.dump(ref, open(sys.argv[2], 'w'), indent=1)
print(ref["greedy_text"], len(ref["input_ids"]))
