"""Profile one 131K-token prefill window of HorizonLM base on the GPU (prints a table)."""

import torch

from horizonlm import HorizonConfig, HorizonLM

torch.manual_seed(0)
model = HorizonLM(HorizonConfig.preset("base")).cuda().eval()
tokens = torch.randint(0, 256, (1, 131072), device="cuda")
with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
    _, state = model(tokens)
    _, state = model(tokens, state)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]) as prof:
        model(tokens, state)
        torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=60))
