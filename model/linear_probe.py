"""Evaluation heads on frozen features: a linear probe and a weighted kNN, as tensor code.

Both take plain feature matrices (N, d) and int64 labels (N,), so they know nothing about
images, patches or checkpoints; ``probe.py`` extracts the features and calls them, and the
benchmarks can call them on any cached features. Accuracies are fractions in [0, 1].

Linear probe (the EMP-SSL reference protocol): one ``nn.Linear(d, C)`` on the raw features
(no standardization), SGD lr 0.03, momentum 0.9, weight decay 5e-5 (on weight and bias),
batch 100, cosine decay of the lr over the epochs stepped once per epoch
(lr_e = lr * (1 + cos(pi * e / epochs)) / 2), 100 epochs. Unlike the reference we keep the
last, partial batch of every epoch (it drops it), so small subsets still train.
The reported accuracy is the final epoch's; the best epoch's test accuracy is returned too,
but it is selected on the test split and is only for comparison with the reference code.

kNN (InstDisc-style, as the reference's WeightedKNNClassifier): cosine similarity between
L2-normalized features, the k most similar training points vote for their class with weight
exp(sim / T); k = 20, T = 0.07.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm import tqdm


def _check(train_x, train_y, test_x, test_y) -> None:
    if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"features must be (N, d) with the same d, got {tuple(train_x.shape)} "
                         f"and {tuple(test_x.shape)}")
    if train_y.shape != (train_x.shape[0],) or test_y.shape != (test_x.shape[0],):
        raise ValueError("labels must be (N,) and match their features")
    if train_x.shape[0] == 0 or test_x.shape[0] == 0:
        raise ValueError("empty train or test features")


def _num_classes(num_classes: int | None, *labels: torch.Tensor) -> int:
    top = max(int(y.max()) for y in labels) + 1
    if num_classes is None:
        return top
    if top > num_classes:
        raise ValueError(f"label {top - 1} out of range for {num_classes} classes")
    return num_classes


@torch.no_grad()
def _predict(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, chunk: int = 8192):
    return torch.cat([torch.addmm(bias, x[i:i + chunk], weight.T).argmax(1)
                      for i in range(0, len(x), chunk)])


@torch.no_grad()
def train_linear_probe(train_x: torch.Tensor, train_y: torch.Tensor,
                       test_x: torch.Tensor, test_y: torch.Tensor, *,
                       num_classes: int | None = None, epochs: int = 100, lr: float = 0.03,
                       momentum: float = 0.9, weight_decay: float = 5e-5, batch_size: int = 100,
                       seed: int = 0, device: torch.device | str = "cpu",
                       progress: bool = True, desc: str = "linear probe") -> dict:
    """Train a linear classifier on frozen features; evaluate on the test features every epoch.

    The step is ``torch.optim.SGD`` on ``nn.Linear`` + mean cross-entropy, written out
    (softmax-regression gradient, no autograd) so one step is a handful of kernels:

        g = (softmax(x W^T + b) - onehot(y)) / batch          # dL/dlogits   (b, C)
        d_W = g^T x + wd W,  d_b = sum(g) + wd b
        buf = momentum * buf + d,  p -= lr_e * buf            # SGD, dampening 0, no Nesterov

    Returns ``{"final_top1", "best_top1", "best_epoch", "final_train_top1",
    "final_train_loss", "history", "test_pred", "weight", "bias"}``: ``history`` is one dict
    per epoch (epoch, lr, test_top1), ``test_pred`` the final classifier's test predictions
    (int64), weight (C, d) and bias (C,) the final classifier, all on the CPU.
    The same seed, features and device give the same result.
    """
    _check(train_x, train_y, test_x, test_y)
    if epochs < 1 or batch_size < 1:
        raise ValueError("epochs and batch_size must be >= 1")
    device = torch.device(device)
    C = _num_classes(num_classes, train_y, test_y)
    xtr = train_x.to(device, torch.float32)  # (N, d)
    ytr = train_y.to(device, torch.int64)
    xte = test_x.to(device, torch.float32)  # (M, d)
    yte = test_y.to(device, torch.int64)
    N, d = xtr.shape

    # nn.Linear's default init, drawn from our own generator so the global RNG is untouched.
    gen = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(d)
    weight = ((torch.rand(C, d, generator=gen) * 2 - 1) * bound).to(device)  # (C, d)
    bias = ((torch.rand(C, generator=gen) * 2 - 1) * bound).to(device)  # (C,)
    buf_w, buf_b = torch.zeros_like(weight), torch.zeros_like(bias)

    history = []
    bar = tqdm(range(epochs), desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for epoch in bar:
        epoch_lr = lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
        order = torch.randperm(N, generator=gen).to(device)
        for i in range(0, N, batch_size):
            idx = order[i:i + batch_size]
            xb, yb = xtr.index_select(0, idx), ytr.index_select(0, idx)  # (b, d), (b,)
            g = torch.addmm(bias, xb, weight.T).softmax(1)  # (b, C)
            g.scatter_add_(1, yb[:, None], torch.full_like(g[:, :1], -1.0))  # - onehot(y)
            grad_w = torch.addmm(weight, g.T, xb, beta=weight_decay, alpha=1.0 / len(idx))
            grad_b = g.sum(0).div_(len(idx)).add_(bias, alpha=weight_decay)
            torch.add(grad_w, buf_w, alpha=momentum, out=buf_w)
            torch.add(grad_b, buf_b, alpha=momentum, out=buf_b)
            weight.add_(buf_w, alpha=-epoch_lr)
            bias.add_(buf_b, alpha=-epoch_lr)
        test_pred = _predict(weight, bias, xte)
        test_top1 = (test_pred == yte).sum().item() / len(yte)
        history.append({"epoch": epoch, "lr": epoch_lr, "test_top1": test_top1})
        bar.set_postfix(test=f"{100 * test_top1:.2f}%")
    bar.close()

    train_loss, train_correct = 0.0, 0
    for i in range(0, N, 8192):  # the final classifier on the whole train split
        logits = torch.addmm(bias, xtr[i:i + 8192], weight.T)
        train_loss += F.cross_entropy(logits, ytr[i:i + 8192], reduction="sum").item()
        train_correct += (logits.argmax(1) == ytr[i:i + 8192]).sum().item()
    best = max(history, key=lambda h: h["test_top1"])
    return {"final_top1": history[-1]["test_top1"], "best_top1": best["test_top1"],
            "best_epoch": best["epoch"], "final_train_top1": train_correct / N,
            "final_train_loss": train_loss / N, "history": history, "test_pred": test_pred.cpu(),
            "weight": weight.cpu(), "bias": bias.cpu()}


@torch.no_grad()
def knn_predict(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, *,
                num_classes: int, k: int = 20, temperature: float = 0.07,
                chunk_elems: int = 1 << 26) -> torch.Tensor:
    """Weighted-kNN class of every test point (int64, on the features' device).

    Cosine similarity on L2-normalized features; the k nearest training points vote with
    weight exp(sim / temperature). The (chunk, N) similarity matrix is bounded by chunk_elems.
    """
    if k < 1 or temperature <= 0:
        raise ValueError("k must be >= 1 and temperature > 0")
    train = F.normalize(train_x.float(), dim=1)  # (N, d)
    test = F.normalize(test_x.float().to(train.device), dim=1)  # (M, d)
    labels = train_y.to(train.device, torch.int64)
    k = min(k, train.shape[0])
    chunk = max(1, chunk_elems // train.shape[0])
    preds = []
    for i in range(0, test.shape[0], chunk):
        sim = test[i:i + chunk] @ train.T  # (m, N)
        top_sim, top_idx = sim.topk(k, dim=1)  # (m, k)
        # exp((sim - max) / T): the same votes up to a per-row factor, without overflow at small T
        weights = ((top_sim - top_sim[:, :1]) / temperature).exp()
        votes = torch.zeros(sim.shape[0], num_classes, device=train.device)  # (m, C)
        votes.scatter_add_(1, labels[top_idx], weights)
        preds.append(votes.argmax(1))
    return torch.cat(preds)


def knn_top1(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
             test_y: torch.Tensor, *, num_classes: int | None = None, k: int = 20,
             temperature: float = 0.07) -> float:
    """Weighted-kNN top-1 accuracy (a fraction in [0, 1]); see :func:`knn_predict`."""
    _check(train_x, train_y, test_x, test_y)
    C = _num_classes(num_classes, train_y, test_y)
    pred = knn_predict(train_x, train_y, test_x, num_classes=C, k=k, temperature=temperature)
    return (pred.cpu() == test_y.cpu()).sum().item() / len(test_y)
