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

from .protocol import PROBE


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


def _sgd_epoch(xtr: torch.Tensor, ytr: torch.Tensor, order: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor, buf_w: torch.Tensor, buf_b: torch.Tensor, neg_one: torch.Tensor, *,
               lr: float | torch.Tensor, momentum: float, weight_decay: float,
               batch_size: int) -> None:
    """One epoch of the probe's SGD over ``order`` (N,) in place on weight/bias and their momentum
    buffers (formula in :func:`train_linear_probe`). ``lr``: a float, or a 0-dim tensor (the
    CUDA-graph epoch, which reads it on the device). ``neg_one``: -1.0, (batch_size, 1)."""
    for i in range(0, order.shape[0], batch_size):
        idx = order[i:i + batch_size]
        b = idx.shape[0]
        xb, yb = xtr.index_select(0, idx), ytr.index_select(0, idx)  # (b, d), (b,)
        g = torch.addmm(bias, xb, weight.T).softmax(1)  # (b, C)
        g.scatter_add_(1, yb[:, None], neg_one[:b])  # - onehot(y)
        grad_w = torch.addmm(weight, g.T, xb, beta=weight_decay, alpha=1.0 / b)
        grad_b = g.sum(0).div_(b).add_(bias, alpha=weight_decay)
        torch.add(grad_w, buf_w, alpha=momentum, out=buf_w)
        torch.add(grad_b, buf_b, alpha=momentum, out=buf_b)
        if isinstance(lr, torch.Tensor):
            weight.addcmul_(buf_w, lr, value=-1.0)
            bias.addcmul_(buf_b, lr, value=-1.0)
        else:
            weight.add_(buf_w, alpha=-lr)
            bias.add_(buf_b, alpha=-lr)


class _GraphedEpoch:
    """An epoch (SGD over every batch, then the test predictions) captured once as a CUDA graph
    and replayed: one launch instead of ~13 kernel launches per batch from Python. The epoch's
    order and lr are static device tensors filled before each replay. Without CUDA (``capture``
    False) the same static epoch runs uncaptured."""

    def __init__(self, run_epoch, order_like: torch.Tensor, capture: bool):
        self.run_epoch = run_epoch  # (order, lr tensor) -> test predictions (M,)
        self.order = torch.empty_like(order_like)
        self.lr = torch.zeros((), device=order_like.device)
        self.graph, self.pred = None, None
        if capture:
            self.order.copy_(order_like)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.pred = run_epoch(self.order, self.lr)  # recorded, not run

    def __call__(self, order: torch.Tensor, lr: float) -> torch.Tensor:
        self.order.copy_(order)
        self.lr.fill_(lr)
        if self.graph is None:
            return self.run_epoch(self.order, self.lr)
        self.graph.replay()
        return self.pred


@torch.no_grad()
def train_linear_probe(train_x: torch.Tensor, train_y: torch.Tensor,
                       test_x: torch.Tensor, test_y: torch.Tensor, *,
                       num_classes: int | None = None, epochs: int = PROBE.probe_epochs,
                       lr: float = PROBE.probe_lr, momentum: float = PROBE.probe_momentum,
                       weight_decay: float = PROBE.probe_weight_decay,
                       batch_size: int = PROBE.probe_batch_size, seed: int = PROBE.seed, device: torch.device | str = "cpu",
                       progress: bool = True, desc: str = "linear probe",
                       graph: bool | None = None) -> dict:
    """Train a linear classifier on frozen features; evaluate on the test features every epoch.

    The step is ``torch.optim.SGD`` on ``nn.Linear`` + mean cross-entropy, written out
    (softmax-regression gradient, no autograd) so one step is a handful of kernels:

        g = (softmax(x W^T + b) - onehot(y)) / batch          # dL/dlogits   (b, C)
        d_W = g^T x + wd W,  d_b = sum(g) + wd b
        buf = momentum * buf + d,  p -= lr_e * buf            # SGD, dampening 0, no Nesterov

    Everything stays on ``device``: the features (moved once; features already there are not
    copied), every epoch's shuffled order (drawn up front on the CPU generator, so the same
    seed gives the same orders on any device, then copied once), and the per-epoch test
    accuracies, read back once at the end: no host round trip per batch or per epoch.
    ``graph`` (default: on CUDA) runs each epoch as a replayed CUDA graph (:class:`_GraphedEpoch`;
    the lr is then a device tensor, which changes the last bits of the update); ``graph=True``
    without CUDA runs that static epoch uncaptured.

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

    # nn.Linear's default init, drawn from our own generator so the global RNG is untouched;
    # then every epoch's order from the same generator (as drawn one epoch at a time before)
    gen = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(d)
    weight = ((torch.rand(C, d, generator=gen) * 2 - 1) * bound).to(device)  # (C, d)
    bias = ((torch.rand(C, generator=gen) * 2 - 1) * bound).to(device)  # (C,)
    orders = torch.stack([torch.randperm(N, generator=gen) for _ in range(epochs)]).to(device)
    buf_w, buf_b = torch.zeros_like(weight), torch.zeros_like(bias)
    neg_one = torch.full((min(batch_size, N), 1), -1.0, device=device)
    lrs = [lr * 0.5 * (1.0 + math.cos(math.pi * e / epochs)) for e in range(epochs)]
    hp = dict(momentum=momentum, weight_decay=weight_decay, batch_size=batch_size)

    def run_epoch(order, epoch_lr):  # -> test predictions (M,)
        _sgd_epoch(xtr, ytr, order, weight, bias, buf_w, buf_b, neg_one, lr=epoch_lr, **hp)
        return _predict(weight, bias, xte)

    if graph is None:
        graph = device.type == "cuda"
    if graph:
        capture = device.type == "cuda"
        if capture:  # warm up (cuBLAS, allocator) outside the capture, on copies of the state
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                _sgd_epoch(xtr, ytr, orders[0], weight.clone(), bias.clone(), buf_w.clone(),
                           buf_b.clone(), neg_one, lr=torch.zeros((), device=device), **hp)
                _predict(weight, bias, xte)
            torch.cuda.current_stream().wait_stream(side)
        step_epoch = _GraphedEpoch(run_epoch, orders[0], capture)
    else:
        step_epoch = run_epoch

    correct = torch.zeros(epochs, dtype=torch.int64, device=device)  # test hits per epoch
    for epoch in tqdm(range(epochs), desc=desc, disable=not progress, leave=False,
                      dynamic_ncols=True):
        test_pred = step_epoch(orders[epoch], lrs[epoch])
        correct[epoch] = (test_pred == yte).sum()
    test_pred = test_pred.clone()
    history = [{"epoch": e, "lr": lrs[e], "test_top1": c / len(yte)}
               for e, c in enumerate(correct.tolist())]  # the one read-back of the epochs

    train_loss = torch.zeros((), dtype=torch.float64, device=device)
    train_correct = torch.zeros((), dtype=torch.int64, device=device)
    for i in range(0, N, 8192):  # the final classifier on the whole train split
        logits = torch.addmm(bias, xtr[i:i + 8192], weight.T)
        train_loss += F.cross_entropy(logits, ytr[i:i + 8192], reduction="sum")
        train_correct += (logits.argmax(1) == ytr[i:i + 8192]).sum()
    best = max(history, key=lambda h: h["test_top1"])
    return {"final_top1": history[-1]["test_top1"], "best_top1": best["test_top1"],
            "best_epoch": best["epoch"], "final_train_top1": train_correct.item() / N,
            "final_train_loss": train_loss.item() / N, "history": history,
            "test_pred": test_pred.cpu(), "weight": weight.cpu(), "bias": bias.cpu()}


@torch.no_grad()
def knn_predict(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, *,
                num_classes: int, k: int = PROBE.knn_k, temperature: float = PROBE.knn_temperature,
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
             test_y: torch.Tensor, *, num_classes: int | None = None, k: int = PROBE.knn_k,
             temperature: float = PROBE.knn_temperature) -> float:
    """Weighted-kNN top-1 accuracy (a fraction in [0, 1]); see :func:`knn_predict`."""
    _check(train_x, train_y, test_x, test_y)
    C = _num_classes(num_classes, train_y, test_y)
    pred = knn_predict(train_x, train_y, test_x, num_classes=C, k=k, temperature=temperature)
    return (pred.cpu() == test_y.cpu()).sum().item() / len(test_y)
