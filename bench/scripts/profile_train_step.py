"""Profile one HorizonLM training step on the GPU: where does the time go? (prints a table)"""

import sys

import torch
import torch.nn.functional as F

from horizonlm import HorizonConfig, HorizonLM

preset = sys.argv[1] if len(sys.argv) > 1 else "base"
length = int(sys.argv[2]) if len(sys.argv) > 2 else 8192
batch = 131072 // length
torch.manual_seed(0)
model = HorizonLM(HorizonConfig.preset(preset)).cuda()
opt = torch.optim.AdamW(model.parameters(), fused=True)
tokens = torch.randint(0, 256, (batch, length + 1), device="cuda")


def step():
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits, _ = model(tokens[:, :-1])
    F.cross_entropy(logits.float().view(-1, 256), tokens[:, 1:].reshape(-1)).backward()
    opt.step()
    opt.zero_grad()


for _ in range(2):
    step()
torch.cuda.synchronize()
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]) as prof:
    step()
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=60))
