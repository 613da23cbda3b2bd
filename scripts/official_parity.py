#!/usr/bin/env python3
"""Writes tests/fixtures/official_parity.safetensors: a few CARP steps of the official code.

The fixture is what tests/official_parity.rs compares carp's CPU step with. It is run by hand,
not in CI, and its output is committed.

The official code (not part of this repository; it is imported from where you put it):

    git clone https://github.com/sthalles/carp /path/to/official-carp
    git -C /path/to/official-carp checkout c9b068b4bbf4978520617baf9f3277f7098f1596

That commit is the one the committed fixture was made with. Requirements: torch (2.x, CPU is
enough), numpy, safetensors; Pillow, torchvision, tensorboard and PyYAML are imported by the
official modules for data loading and logging only, and are replaced by empty stand-ins when
absent. Run, from the repository root:

    python3 scripts/official_parity.py --official /path/to/official-carp \
        --out tests/fixtures/official_parity.safetensors

What runs is the official code: `CARPHead` (MLP with BN and GELU, weight-normalized
prototypes), `CARPLoss`, `RandomPartition`, `utils.LARS` with `utils.get_params_groups`,
`utils.MultiCropWrapper`, and `main_carp.train_one_epoch` itself for the order within a step
(forwards, partition, loss, teacher EMA, backward, LARS). The harness supplies only what the
official script builds around them: a small torchvision-layout ResNet (bottleneck blocks, a
CIFAR stem, carp's `ResNetConfig { layers: [1, 1, 1], base_width: 8 }`), the initial state, the
views, the per-step lr / teacher momentum / weight decay, a CPU stand-in for `.cuda()`, and a
loss scaler at scale 1 (the official GradScaler's scale is a power of two, exact both ways for
gradients that neither overflow nor underflow).

The initial state is seeded; its 1-d parameters (BN gamma and beta, biases) and BN running
statistics are jittered, because zero-init residual (gamma 0 on each block's last BN) would
leave the residual branches' convolutions without a gradient in the first step.

The same steps run twice: in float32 (the fixture) and in float64 (the partition replayed,
`.float()` made a no-op, the loss's eps then float64's). The float32-vs-float64 deviation of
each quantity, in the metric the Rust test uses, is printed and stored in the metadata: the
floor a float32 implementation cannot be asked to beat (gradients cross ReLU kinks, where
rounding can flip an activation's side).

Fixture keys (float32 unless said): `init.param.NAME`, `init.buffer.NAME` (student = teacher;
carp's torchvision names); per step k = 0, 1, 2: `stepK.view1`, `stepK.view2` (N, 3, S, S),
`stepK.perm` (int64, the K prototype indices in the order the official partition drew them:
block j is perm[j NB:(j + 1) NB]), `stepK.hparams` ([lr, teacher momentum, weight decay]),
`stepK.loss` ([consistency, entropy]), `stepK.student.NAME`, `stepK.teacher.NAME`,
`stepK.momentum.NAME` (LARS mu), `stepK.student_bn.NAME`, `stepK.teacher_bn.NAME` (running
means and variances). Metadata: the model config, the official commit, and the floors.
"""

import argparse
import contextlib
import json
import subprocess
import sys
import types

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import save_file

# The model: carp's ModelConfig { backbone: ResNetConfig { layers: [1, 1, 1], base_width: 8,
# stem: Cifar, block: Bottleneck }, head: HeadConfig { hidden: 64, out: 32, prototypes: 256 } }
# with NB = 64.
LAYERS = [1, 1, 1]
BASE_WIDTH = 8
HIDDEN = 64
OUT = 32
K = 256
NB = 64
N = 16  # images per step
SIDE = 16
STEPS = 3
# Per-step lr and teacher momentum, exact in float32 (and 1 - m too), so that both
# implementations start from the same numbers; the lr is large and m small so that the student's
# update and the teacher's EMA are far above rounding. The weight decay is large enough to move
# the LARS trust ratio measurably.
LRS = [0.5, 0.375, 0.25]
MOMENTA = [0.5, 0.75, 0.875]
WEIGHT_DECAY = float(np.float32(1e-3))
SEED = 34


def stub_missing(name, **attrs):
    """An empty stand-in for a module the official files import only for data or logging."""
    try:
        __import__(name)
    except ImportError:
        mod = types.ModuleType(name)
        for k, v in attrs.items():
            setattr(mod, k, v)
        sys.modules[name] = mod
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, mod)


def import_official(path):
    stub_missing("PIL", Image=None, ImageFilter=None, ImageOps=None)
    stub_missing("yaml")
    stub_missing("torchvision")
    for sub in ("datasets", "models", "transforms"):
        stub_missing("torchvision." + sub)
    stub_missing("torch.utils.tensorboard", SummaryWriter=None)
    sys.path.insert(0, path)
    import main_carp
    import utils
    from modules.carp_head import CARPHead
    from modules.carp_loss import CARPLoss
    from modules.random_partition import RandomPartition

    return main_carp, utils, CARPHead, CARPLoss, RandomPartition


# The CPU stands in for the GPU the official code moves everything to.
torch.Tensor.cuda = lambda self, *a, **k: self
nn.Module.cuda = lambda self, *a, **k: self


class Bottleneck(nn.Module):
    """torchvision's Bottleneck (stride on the 3x3 conv), same module names."""

    def __init__(self, inplanes, width, stride):
        super().__init__()
        out = width * 4
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out)
            )

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class SmallResNet(nn.Module):
    """torchvision's ResNet layout with a 3x3/1 stem and no max pool; torchvision's init with
    zero_init_residual=True."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, BASE_WIDTH, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(BASE_WIDTH)
        self.relu = nn.ReLU(inplace=True)
        inplanes = BASE_WIDTH
        for stage, blocks in enumerate(LAYERS):
            width = BASE_WIDTH << stage
            seq = []
            for b in range(blocks):
                seq.append(Bottleneck(inplanes, width, 2 if stage > 0 and b == 0 else 1))
                inplanes = width * 4
            setattr(self, f"layer{stage + 1}", nn.Sequential(*seq))
        self.feature_dim = inplanes
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        for m in self.modules():
            if isinstance(m, Bottleneck):
                nn.init.constant_(m.bn3.weight, 0)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        for stage in range(len(LAYERS)):
            x = getattr(self, f"layer{stage + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


# The official head's module names -> carp's (src/nn/head.rs).
HEAD_NAMES = {
    "head.mlp.0.": "head.fc1.",
    "head.mlp.1.": "head.bn1.",
    "head.mlp.3.": "head.fc2.",
    "head.mlp.4.": "head.bn2.",
    "head.mlp.6.": "head.fc3.",
    "head.last_layer.weight_v": "prototypes.weight",
}


def carp_name(name):
    """carp's name for an official parameter or buffer; None for what carp does not keep."""
    if name.endswith("num_batches_tracked") or name.endswith("weight_g"):
        return None
    if name.startswith("backbone."):
        return name[len("backbone.") :]
    for old, new in HEAD_NAMES.items():
        if name.startswith(old):
            return new + name[len(old) :]
    raise ValueError(f"no carp name for {name}")


def params_of(net):
    return {carp_name(n): p.detach().clone() for n, p in net.named_parameters() if carp_name(n)}


def buffers_of(net):
    return {carp_name(n): b.detach().clone() for n, b in net.named_buffers() if carp_name(n)}


class StudentDDP(nn.Module):
    """The `.module` attribute the official loop reads, as DistributedDataParallel has."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)


class UnitScaler:
    """GradScaler at scale 1 (see the module docstring)."""

    def scale(self, loss):
        return loss

    def step(self, optimizer):
        optimizer.step()

    def update(self):
        pass


@contextlib.contextmanager
def float_is(dtype):
    """In the float64 run, the loop's `.float()` casts keep float64."""
    if dtype == torch.float32:
        yield
        return
    saved = torch.Tensor.float
    torch.Tensor.float = lambda self, *a, **k: self.to(dtype)
    try:
        yield
    finally:
        torch.Tensor.float = saved


def initial_state(off):
    torch.manual_seed(SEED)
    backbone = SmallResNet()
    net = off.utils.MultiCropWrapper(
        backbone,
        off.CARPHead(
            backbone.feature_dim, K, use_bn=True, norm_last_layer=True,
            hidden_dim=HIDDEN, bottleneck_dim=OUT,
        ),
    )
    g = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for _, p in net.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        for name, b in net.named_buffers():
            if name.endswith("running_mean"):
                b.add_(0.1 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.mul_(torch.exp(0.2 * torch.randn(b.shape, generator=g)))
    return net.state_dict()


def views(step):
    g = torch.Generator().manual_seed(SEED + 100 + step)
    return [torch.randn(N, 3, SIDE, SIDE, generator=g) for _ in range(2)]


def run(off, init, dtype, perms=None):
    """STEPS steps of the official loop; returns per-step snapshots and the drawn partitions."""

    def build():
        backbone = SmallResNet()
        head = off.CARPHead(
            backbone.feature_dim, K, use_bn=True, norm_last_layer=True,
            hidden_dim=HIDDEN, bottleneck_dim=OUT,
        )
        net = off.utils.MultiCropWrapper(backbone, head)
        net.load_state_dict(init)
        return net.to(dtype)

    student, teacher = build(), build()
    for p in teacher.parameters():
        p.requires_grad = False
    ddp = StudentDDP(student)
    optimizer = off.utils.LARS(off.utils.get_params_groups(ddp))
    optimizer.zero_grad()
    args = argparse.Namespace(
        ncrops=2, out_dim=K, partition_size=NB, gradient_accumulation_steps=1, print_freq=1
    )
    partitioning = off.RandomPartition(args)
    criterion = off.CARPLoss()
    terms = []
    criterion.register_forward_hook(
        lambda mod, inp, out: terms.append([float(out[0]), float(out[1])])
    )
    drawn = []
    real_multinomial = torch.multinomial

    def multinomial(*a, **k):
        out = real_multinomial(*a, **k) if perms is None else perms[len(drawn)].clone()
        drawn.append(out.clone())
        return out

    torch.multinomial = multinomial
    snaps = []
    try:
        with float_is(dtype):
            for step in range(STEPS):
                batch = [(list(v.to(dtype) for v in views(step)), None)]
                sched = np.array([[LRS[s], MOMENTA[s], WEIGHT_DECAY] for s in range(STEPS)])
                # One official epoch of one batch per step, so each step's state can be read:
                # its global iteration `it` is then the epoch, which indexes the schedules.
                off.main_carp.train_one_epoch(
                    ddp, teacher, teacher, criterion, batch, optimizer,
                    sched[:, 0], sched[:, 2], sched[:, 1], step, UnitScaler(),
                    partitioning, None, args,
                )
                mu = {
                    carp_name(n): optimizer.state[p]["mu"].detach().clone()
                    for n, p in student.named_parameters()
                    if p.requires_grad
                }
                snaps.append(
                    {
                        "loss": torch.tensor(terms[step], dtype=torch.float64),
                        "student": params_of(student),
                        "teacher": params_of(teacher),
                        "momentum": mu,
                        "student_bn": buffers_of(student),
                        "teacher_bn": buffers_of(teacher),
                    }
                )
                for net in (student, teacher):
                    # The prototypes' gain is frozen at 1 (carp has none): it must stay 1.
                    assert bool((net.head.last_layer.weight_g == 1).all())
    finally:
        torch.multinomial = real_multinomial
    assert len(drawn) == STEPS
    return snaps, drawn


# The Rust test's metric (tests/official_parity.rs, `compare`), so that the floors below are
# in its units. Per tensor, the largest elementwise |a - b| beyond 4 eps |b| (2 to 4 ulps of the
# stored float32 value: each step stores the parameters in float32, which alone moves them by
# half an ulp), relative to a scale S of what the step changed: for the student and the teacher
# the largest element of the student's update so far, for the LARS momentum its largest element,
# for BN running statistics their largest change so far. S is at least 1/1000 of the largest
# S of its quantity, so that a tensor the step leaves unchanged in exact arithmetic (the
# biases right before a train-mode BN get a zero gradient) is compared on its group's scale,
# not on its rounding noise. The loss terms: the absolute difference.
EPS32 = 2.0**-23
STORE_ULPS = 4.0
GROUP_FLOOR = 1e-3
QUANTITIES = ("student", "teacher", "momentum", "student_bn", "teacher_bn")


def scales(q, ref, init):
    """(S, unmoved) per tensor of quantity q at one step, from the reference snapshot `ref`."""
    if q in ("student", "teacher"):
        raw = {n: (t.double() - init["param"][n].double()).abs().max().item()
               for n, t in ref["student"].items()}
    elif q == "momentum":
        raw = {n: t.double().abs().max().item() for n, t in ref["momentum"].items()}
    else:
        raw = {n: (t.double() - init["buffer"][n].double()).abs().max().item()
               for n, t in ref[q].items()}
    floor = GROUP_FLOOR * max(raw.values())
    return {n: (max(v, floor), v < floor) for n, v in raw.items()}


def deviation(got, want, scale):
    got, want = got.double(), want.double()
    excess = ((got - want).abs() - STORE_ULPS * EPS32 * want.abs()).clamp(min=0)
    return excess.max().item() / scale


def floors(s32, s64, init):
    """Per step, the largest float32-vs-float64 deviation of each quantity over its tensors
    (moved and unmoved apart), the float64 run as the reference."""
    out = []
    for a, b in zip(s32, s64):
        row = {"loss": (a["loss"] - b["loss"]).abs().max().item()}
        for q in QUANTITIES:
            for n, (scale, unmoved) in scales(q, b, init).items():
                key = q + (" (unmoved)" if unmoved else "")
                row[key] = max(row.get(key, 0.0), deviation(a[q][n], b[q][n], scale))
        out.append(row)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--official", required=True, help="a checkout of github.com/sthalles/carp")
    ap.add_argument("--out", default="tests/fixtures/official_parity.safetensors")
    a = ap.parse_args()
    mc, utils, CARPHead, CARPLoss, RandomPartition = import_official(a.official)
    off = types.SimpleNamespace(
        main_carp=mc, utils=utils, CARPHead=CARPHead, CARPLoss=CARPLoss,
        RandomPartition=RandomPartition,
    )
    try:
        commit = subprocess.run(
            ["git", "-C", a.official, "rev-parse", "HEAD"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"

    init = initial_state(off)
    s32, perms = run(off, init, torch.float32)
    s64, _ = run(off, init, torch.float64, perms)
    # Student and teacher start equal, so one initial state serves both.
    init_sets = {
        "param": {carp_name(n): t for n, t in init.items() if carp_name(n) and "running_" not in n},
        "buffer": {carp_name(n): t for n, t in init.items() if carp_name(n) and "running_" in n},
    }
    fl = floors(s32, s64, init_sets)
    for k, row in enumerate(fl):
        print(f"step {k} f32-vs-f64: " + ", ".join(f"{q} {v:.3e}" for q, v in row.items()))

    tensors = {}
    for kind, d in init_sets.items():
        for name, t in d.items():
            tensors[f"init.{kind}.{name}"] = t.float().contiguous()
    for k in range(STEPS):
        v1, v2 = views(k)
        tensors[f"step{k}.view1"] = v1
        tensors[f"step{k}.view2"] = v2
        tensors[f"step{k}.perm"] = perms[k].to(torch.int64)
        tensors[f"step{k}.hparams"] = torch.tensor(
            [LRS[k], MOMENTA[k], WEIGHT_DECAY], dtype=torch.float32
        )
        tensors[f"step{k}.loss"] = s32[k]["loss"].float()
        for q in QUANTITIES:
            for name, t in s32[k][q].items():
                tensors[f"step{k}.{q}.{name}"] = t.float().contiguous()
    meta = {
        "official_commit": commit,
        "torch": torch.__version__,
        "config": json.dumps(
            {"layers": LAYERS, "base_width": BASE_WIDTH, "stem": "cifar", "block": "bottleneck",
             "hidden": HIDDEN, "out": OUT, "prototypes": K, "nb": NB, "n": N, "side": SIDE,
             "steps": STEPS, "seed": SEED}
        ),
        "f32_vs_f64": json.dumps(fl),
    }
    save_file(tensors, a.out, metadata=meta)
    print(f"wrote {a.out}: {len(tensors)} tensors, official commit {commit}")


if __name__ == "__main__":
    main()
