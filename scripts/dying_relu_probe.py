"""Plain-PyTorch probe behind README "Why it trains": which ReLUs die, and when, at a given lr.

Trains a network (All-CNN-C unless the spec says "net": "<family>/<variant>", e.g. "a/base") on
GCN + ZCA of the first 3,000 training images (ALLCONV_PROBE_N to change), SGD momentum 0.9, weight
decay 1e-3, for a number of steps and prints, every 20 steps (ALLCONV_PROBE_EVERY), the loss, the gradient norm and the
fraction of active units after each ReLU, for each JSON spec (keys of allconv.models.build, plus
lr, steps, bs = batch size, warmup = linear warm-up steps, freeze_bias = keep hidden biases at 0,
clip = gradient-norm clipping threshold, cap = the project's update cap (clip to cap / lr),
fan_out = Kaiming fan-out init, zero_final = zero class-layer weights, maxnorm = cap on every
hidden filter's L2 norm after each step, as pylearn2's max_kernel_norm).

    python scripts/dying_relu_probe.py data/cifar10-jpeg-arrays.npz '{"lr":0.25,"final_bias":1.0}'
"""

import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

from allconv.models import build
from allconv.preprocessing import ZCA, global_contrast_normalize

torch.set_num_threads(2)
d, n = np.load(sys.argv[1]), int(os.environ.get("ALLCONV_PROBE_N", 3000))
x = global_contrast_normalize(torch.from_numpy(d["x_train"][:n]).permute(0, 3, 1, 2).reshape(n, -1).float())
x = ZCA(0.1).fit(x).transform(x).reshape(-1, 3, 32, 32)
y = torch.from_numpy(d["y_train"][:n])
for spec in sys.argv[2:]:
    kw = json.loads(spec)
    lr, steps, bs = kw.pop("lr"), kw.pop("steps", 120), kw.pop("bs", 128)
    warmup, freeze_bias, clip = kw.pop("warmup", 0), kw.pop("freeze_bias", False), kw.pop("clip", None)
    fan_out, zero_final, maxnorm = kw.pop("fan_out", False), kw.pop("zero_final", False), kw.pop("maxnorm", None)
    kw_pool_gain = kw.pop("pool_gain", False)
    if "cap" in kw:
        clip = kw.pop("cap") / lr
    family, variant = kw.pop("net", "c/allcnn").split("/")
    torch.manual_seed(0)
    plain = {"final_bias": 0.0, "final_weights": "init", "pool_gain": False}  # a spec names what it changes
    net = build(family, variant, width=kw.pop("width", 0.25), **{**plain, **kw})
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    if kw_pool_gain:
        from allconv.models import correct_pool_gain

        correct_pool_gain(net)
    if fan_out:
        for m in convs:
            torch.nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    if zero_final:
        torch.nn.init.zeros_(convs[-1].weight)
    if freeze_bias:
        for m in convs[:-1]:
            m.bias.requires_grad_(False)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=lr, momentum=0.9, weight_decay=1e-3)
    active: dict[int, float] = {}
    for k, relu in enumerate(m for m in net.modules() if isinstance(m, torch.nn.ReLU)):
        relu.register_forward_hook(lambda m, i, o, k=k, a=active: a.__setitem__(k, (o > 0).float().mean().item()))
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup) if warmup else lr
        idx = torch.randint(0, n, (bs,), generator=g)
        loss = F.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(net.parameters(), clip or float("inf"))
        opt.step()
        if maxnorm:
            with torch.no_grad():
                for m in convs[:-1]:
                    m.weight.mul_(maxnorm / m.weight.flatten(1).norm(dim=1).clamp(min=maxnorm)[:, None, None, None])
        if step % int(os.environ.get("ALLCONV_PROBE_EVERY", 20)) == 0 or step == steps - 1:
            print(spec, step, f"loss {loss.item():.3f} grad norm {gnorm:.2f} active",
                  [round(active[k], 2) for k in sorted(active)], flush=True)
