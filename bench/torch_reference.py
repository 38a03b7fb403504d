#!/usr/bin/env python3
"""PyTorch reference for `cargo xtask bench`: the IDENTICAL U-Net of ddpm-unet (same layers,
same order, same parameter count, built from the same JSON config that `ddpm bench --mode
config` prints), timed the same way: a full training step (forward, ε-MSE, backward, AdamW,
EMA) and an inference forward pass. Prints one JSON line, like `ddpm bench`.

    python3 bench/torch_reference.py --config '{"base_channels": 32, ...}' --mode train \
        --batch 128 --threads 2 --iters 5
"""

import argparse
import contextlib
import json
import math
import resource
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def timestep_embedding(t, dim):
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class ResBlock(nn.Module):
    def __init__(self, cin, cout, emb, groups, dropout):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-5)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb_proj = nn.Linear(emb, cout)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-5)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else None
        self.dropout = dropout

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb_proj(emb)[:, :, None, None]
        h = F.silu(self.norm2(h))
        h = self.conv2(F.dropout(h, self.dropout, self.training))
        return (self.skip(x) if self.skip is not None else x) + h


class Attention(nn.Module):
    def __init__(self, ch, groups, heads):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps=1e-5)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        self.heads = heads

    def forward(self, x):
        b, c, h, w = x.shape
        d = c // self.heads
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, d, h * w)
        q, k, v = (qkv[:, i].transpose(2, 3) for i in range(3))  # [B, heads, HW, d]
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(out.transpose(2, 3).reshape(b, c, h, w))


class UNet(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        base, mults = cfg["base_channels"], cfg["channel_mults"]
        groups, heads, drop = cfg["groups"], cfg["num_heads"], cfg["dropout"]
        emb = 4 * base
        self.base = base
        self.time_embed = nn.Sequential(nn.Linear(base, emb), nn.SiLU(), nn.Linear(emb, emb))
        ncls = cfg["num_classes"]
        self.class_embed = nn.Embedding(ncls + 1, emb) if ncls > 0 else None
        self.null_class = ncls
        self.conv_in = nn.Conv2d(cfg["in_channels"], base, 3, padding=1)
        skips, ch = [base], base
        self.down = nn.ModuleList()
        for level, m in enumerate(mults):
            out = base * m
            lv = nn.Module()
            lv.res, lv.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg["num_res_blocks"]):
                lv.res.append(ResBlock(ch, out, emb, groups, drop))
                ch = out
                if level in cfg["attention_levels"]:
                    lv.attn.append(Attention(ch, groups, heads))
                skips.append(ch)
            lv.resample = None
            if level + 1 < len(mults):
                skips.append(ch)
                lv.resample = nn.Conv2d(ch, ch, 3, stride=2, padding=1)
            self.down.append(lv)
        self.mid = nn.ModuleList(
            [ResBlock(ch, ch, emb, groups, drop), Attention(ch, groups, heads),
             ResBlock(ch, ch, emb, groups, drop)])
        self.up = nn.ModuleList()
        for level in reversed(range(len(mults))):
            out = base * mults[level]
            lv = nn.Module()
            lv.res, lv.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg["num_res_blocks"] + 1):
                lv.res.append(ResBlock(ch + skips.pop(), out, emb, groups, drop))
                ch = out
                if level in cfg["attention_levels"]:
                    lv.attn.append(Attention(ch, groups, heads))
            lv.resample = nn.Conv2d(ch, ch, 3, padding=1) if level > 0 else None
            self.up.append(lv)
        self.norm_out = nn.GroupNorm(groups, ch, eps=1e-5)
        self.conv_out = nn.Conv2d(ch, cfg["in_channels"], 3, padding=1)

    def forward(self, x, t, labels):
        emb = self.time_embed(timestep_embedding(t, self.base))
        if self.class_embed is not None:
            emb = emb + self.class_embed(labels)
        hs = [self.conv_in(x)]
        h = hs[0]
        for lv in self.down:
            for j, res in enumerate(lv.res):
                h = res(h, emb)
                if j < len(lv.attn):
                    h = lv.attn[j](h)
                hs.append(h)
            if lv.resample is not None:
                h = lv.resample(h)
                hs.append(h)
        h = self.mid[2](self.mid[1](self.mid[0](h, emb)), emb)
        for lv in self.up:
            for j, res in enumerate(lv.res):
                h = res(torch.cat([h, hs.pop()], dim=1), emb)
                if j < len(lv.attn):
                    h = lv.attn[j](h)
            if lv.resample is not None:
                h = lv.resample(F.interpolate(h, scale_factor=2, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="U-Net config JSON (ddpm bench --mode config)")
    p.add_argument("--mode", choices=["train", "forward", "sample"], default="train")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (sample mode)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--autocast", choices=["bf16", "f16"], help="torch.autocast the forward passes")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = json.loads(a.config)
    dev = torch.device(a.device)
    model = UNet(cfg).to(dev)
    params = sum(p.numel() for p in model.parameters())
    compiled = torch.compile(model) if a.compile else model
    low = {"bf16": torch.bfloat16, "f16": torch.float16}.get(a.autocast)

    def run(*args):
        # As `ddpm --autocast`: low-precision products, f32 weights; the loss is taken outside.
        ctx = torch.autocast(dev.type, dtype=low) if low else contextlib.nullcontext()
        with ctx:
            out = compiled(*args)
        return out.float()

    b, s = a.batch, a.image_size
    x = torch.randn(b, cfg["in_channels"], s, s, device=dev)
    labels = torch.randint(0, max(cfg["num_classes"], 1), (b,), device=dev)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    if a.mode == "train":
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=0.0)
        ema = [p.detach().clone() for p in model.parameters()]

        def step():
            t = torch.randint(0, 1000, (b,), device=dev)
            noise = torch.randn_like(x)
            loss = F.mse_loss(run(x + noise, t, labels), noise)  # same FLOPs as q(x_t|x_0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in model.parameters()], 1 - 0.999)
    elif a.mode == "sample":
        # Guided DDIM (eta = 0, leading spacing, clipped x0) at w = 3, linear betas 1e-4..0.02,
        # T = 1000: one forward of 2B (conditional and null labels) per step, as ddpm-sampler does.
        model.eval()
        betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
        abar = torch.cumprod(1 - betas, 0).tolist()
        ts = [i * (1000 // a.steps) for i in range(a.steps)][::-1]
        null = torch.full_like(labels, cfg["num_classes"])
        both = torch.cat([labels, null])
        w = 3.0

        def step():
            with torch.no_grad():
                xt = torch.randn_like(x)
                for i, t in enumerate(ts):
                    tt = torch.full((2 * b,), t, device=dev, dtype=torch.long)
                    e = run(torch.cat([xt, xt]), tt, both)
                    eps = (1 + w) * e[:b] - w * e[b:]
                    ab, ab_prev = abar[t], (abar[ts[i + 1]] if i + 1 < len(ts) else 1.0)
                    x0 = ((xt - math.sqrt(1 - ab) * eps) / math.sqrt(ab)).clamp(-1, 1)
                    eps = (xt - math.sqrt(ab) * x0) / math.sqrt(1 - ab)
                    xt = math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev) * eps
    else:
        model.eval()
        t = torch.randint(0, 1000, (b,), device=dev)

        def step():
            with torch.no_grad():
                run(x, t, labels)

    for _ in range(a.warmup):
        step()
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(a.iters):
        step()
    sync()
    secs = time.perf_counter() - start
    out = {
        "impl": ("pytorch-compile" if a.compile else "pytorch")
        + (f"-{a.autocast}" if a.autocast else ""),
        "torch": torch.__version__,
        "mode": a.mode,
        "params": params,
        "batch": b,
        "threads": torch.get_num_threads(),
        "iters": a.iters,
        "seconds": secs,
        "images_per_s": b * a.iters / secs,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "device": a.device,
    }
    if dev.type == "cuda":
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(out))


if __name__ == "__main__":
    main()
