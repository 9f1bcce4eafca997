"""Plain-PyTorch probe behind README "Why it trains": does All-CNN-C leave 10% in its first epochs?

Trains All-CNN-C (width 0.25, GCN + ZCA, SGD momentum 0.9, weight decay 1e-3, batch 128) on the
first N training images of an arrays file for a few passes and prints test accuracy on 2,000 test
images after each pass, for each JSON spec given (keys of allconv.models.build, plus lr, epochs,
scale = input multiplier, warmup = linear warm-up steps, gain = multiplier on every conv's init,
clip = gradient-norm clipping threshold).

    python scripts/init_probe.py data/cifar10-jpeg-arrays.npz 10000 '{"lr":0.05,"init":"he","final_bias":1.0}'
"""

import json
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from allconv.models import build
from allconv.preprocessing import ZCA, global_contrast_normalize

torch.set_num_threads(2)
path, ntr, nte = sys.argv[1], int(sys.argv[2]), 2000
d = np.load(path)
xtr = torch.from_numpy(d["x_train"][:ntr]).permute(0, 3, 1, 2).reshape(ntr, -1).float()
xte = torch.from_numpy(d["x_test"][:nte]).permute(0, 3, 1, 2).reshape(nte, -1).float()
xtr, xte = global_contrast_normalize(xtr), global_contrast_normalize(xte)
zca = ZCA(0.1).fit(xtr)
xtr, xte = zca.transform(xtr).reshape(-1, 3, 32, 32), zca.transform(xte).reshape(-1, 3, 32, 32)
ytr, yte = torch.from_numpy(d["y_train"][:ntr]), torch.from_numpy(d["y_test"][:nte])
print("whitened train std", round(xtr.std().item(), 3), flush=True)
for spec in sys.argv[3:]:
    kw = json.loads(spec)
    lr, epochs, scale = kw.pop("lr"), kw.pop("epochs", 2), kw.pop("scale", 1.0)
    warmup, gain, clip = kw.pop("warmup", 0), kw.pop("gain", 1.0), kw.pop("clip", None)
    torch.manual_seed(0)
    plain = {"final_bias": 0.0, "final_weights": "init", "pool_gain": False}  # a spec names what it changes
    net = build("c", "allcnn", width=kw.pop("width", 0.25), **{**plain, **kw})
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.mul_(gain)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=1e-3)
    t0, step, accs = time.time(), 0, []
    for _ in range(epochs):
        net.train()
        perm = torch.randperm(ntr)
        for i in range(0, ntr - 127, 128):
            idx = perm[i:i + 128]
            step += 1
            for g in opt.param_groups:
                g["lr"] = lr * min(1.0, step / warmup) if warmup else lr
            loss = F.cross_entropy(net(xtr[idx] * scale), ytr[idx])
            opt.zero_grad()
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
            opt.step()
        net.eval()
        with torch.no_grad():
            accs.append(round((net(xte * scale).argmax(1) == yte).float().mean().item(), 3))
    print(spec, "test accuracy per pass", accs, f"{time.time() - t0:.0f}s", flush=True)
