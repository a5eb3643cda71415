"""One EMP-SSL optimisation step on a patch tensor: encode, fused loss, backward, LARS.

Shared by train.py and benchmarks/train_throughput.py so both measure the same code. It knows
nothing of data sources: it takes patches (n, B, 3, S, S) already on the device.

Three ways to run the same step (each tested against the eager one; no host sync in any):

    eager        encode -> loss -> backward -> LARS, op by op
    compile      torch.compile of the forward and the loss as one graph (the Cholesky log-det,
                 a custom autograd Function, is traced into it; its backward is AOT-compiled
                 with the rest), and of the LARS update (its foreach ops fused); the learning
                 rate is a 0-dim device tensor, so a new value neither recompiles nor syncs
    cuda_graphs  the whole step (forward, loss, backward, LARS) captured once as a CUDA graph
                 on static input and lr tensors and replayed every step (with or without
                 compile). Capture needs a few warm-up steps (cuDNN autotuning, compilation,
                 momentum buffers); the parameters, BatchNorm buffers and optimizer state are
                 saved before them and put back after, so the replayed run is the eager run.
                 The patches (and so the patch generator) stay outside the graph: they are made
                 as before and copied into the static input, which keeps every random draw what
                 the eager run draws. Without CUDA the same static step runs uncaptured (how
                 the CPU tests exercise it).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .loss import emp_ssl_loss


def configure_cuda() -> None:
    """The CUDA backend settings every training step here runs with (train.py and the
    benchmarks): cuDNN autotuning; TF32 for convolutions; full fp32 matmuls. The encoder runs
    in bf16 under autocast, so the fp32 matmuls left are the loss's Gram matrices, where TF32
    costs ~3e-4 relative gradient error."""
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.matmul.allow_tf32 = False


@contextlib.contextmanager
def bn_frozen_stats(model: nn.Module):
    """BatchNorm in train mode (batch statistics) but running averages left untouched."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
    try:
        yield
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom


def model_memory_format(model: nn.Module) -> torch.memory_format:
    """torch.channels_last if the model's 4-D weights are stored channels-last, else
    torch.contiguous_format. Weights whose layout is ambiguous (1x1 kernels, a single input
    channel) are skipped; a model without an unambiguous one counts as contiguous."""
    for p in model.parameters():
        if p.dim() != 4:
            continue
        cl, plain = p.is_contiguous(memory_format=torch.channels_last), p.is_contiguous()
        if cl != plain:
            return torch.channels_last if cl else torch.contiguous_format
    return torch.contiguous_format


class EmpStep:
    """Callable step. ``net`` is what runs forward (maybe DDP-wrapped; pass ``compile=True``
    rather than a compiled module, which compiles the encoder alone), ``model`` the plain module inside it (for BatchNorm handling and
    the state the CUDA graph saves), ``opt`` the optimizer (LARS for ``compile`` and
    ``cuda_graphs``: they pass the lr as a device tensor to ``opt.step(lr=...)``).

    ``patch_chunk`` K > 0 backprops K patch groups at a time (see :meth:`chunked`); with
    ``compile`` only the encoder and the update are compiled then.
    Under DDP (``ddp`` given) Z is all-gathered with gradients so the coding rate sees the
    global batch; DDP's gradient averaging then yields exactly d(global loss)/d(params).
    The patches are handed to ``net`` in the memory format of the model's conv weights
    (:func:`model_memory_format`; make_patches' output already has channels-last strides, so a
    channels-last model costs no copy).
    ``compile_backend``: torch.compile's backend ("inductor"; "aot_eager" traces and runs the
    same graphs without generating code, for quick tests). ``graph_warmup``: eager steps before
    the capture.
    """

    def __init__(self, net: nn.Module, model: nn.Module, opt: torch.optim.Optimizer, *,
                 lam: float = 200.0, eps: float = 0.2, amp: str = "fp32", patch_chunk: int = 0,
                 ddp: nn.Module | None = None, compile: bool = False, cuda_graphs: bool = False,
                 compile_backend: str = "inductor", graph_warmup: int = 3):
        if cuda_graphs and (patch_chunk or ddp is not None):
            raise ValueError("cuda_graphs captures the plain one-process step: not with "
                             "patch_chunk or DDP")
        self.net, self.model, self.opt = net, model, opt
        self.memory_format = model_memory_format(model)
        self.lam, self.eps, self.amp, self.patch_chunk = lam, eps, amp, patch_chunk
        self.ddp = ddp  # the DDP wrapper when training on several ranks, else None
        self.compiled, self.cuda_graphs, self.graph_warmup = compile, cuda_graphs, graph_warmup
        device = next(model.parameters()).device
        # the lr as a device tensor (compile, cuda_graphs): filled each step, read on the device
        self._lr = torch.zeros((), device=device) if (compile or cuda_graphs) else None
        self._forward_loss = self._forward_loss_eager
        self._update = self._update_eager
        if (compile or cuda_graphs) and hasattr(opt, "init_state"):
            opt.init_state()  # the momentum buffers before the first (compiled/captured) update
        if compile:
            if patch_chunk:
                self.net = torch.compile(net, backend=compile_backend)
            else:
                self._forward_loss = torch.compile(self._forward_loss_eager, backend=compile_backend)
            self._update = torch.compile(self._update_eager, backend=compile_backend)
        self._static_in: torch.Tensor | None = None  # cuda_graphs: the captured step's input
        self._static_out: torch.Tensor | None = None  # (3,): loss, tcr, inv of the last replay
        self._graph = None  # torch.cuda.CUDAGraph once captured (None on a CPU)

    def autocast(self, device_type: str):
        # a captured graph must not cache casted weights across the capture (cache_enabled)
        return torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.amp == "bf16",
                              cache_enabled=False if self.cuda_graphs else None)

    def encode(self, patches: torch.Tensor) -> torch.Tensor:
        n, b = patches.shape[:2]
        x = patches.reshape(n * b, *patches.shape[2:]).contiguous(memory_format=self.memory_format)
        with self.autocast(patches.device.type):
            _, z = self.net(x)  # (n*B, d)
        return z.float().view(n, b, -1)  # (n, B, d)

    def loss(self, z: torch.Tensor):
        # check=False: no host sync; a failed Cholesky gives a NaN loss, which the trainer's
        # throttled non-finite check reports. gather: the coding rate sees the global batch.
        return emp_ssl_loss(z, lam=self.lam, eps=self.eps, check=False, gather=self.ddp is not None)

    def _forward_loss_eager(self, patches: torch.Tensor):
        return self.loss(self.encode(patches))  # (loss, tcr, inv) scalars with grad

    def _update_eager(self, lr):
        """LARS step: the groups' lr (eager, lr None) or this step's 0-dim lr tensor."""
        if lr is None:
            self.opt.step()
        else:
            self.opt.step(lr=lr)

    def chunked(self, patches: torch.Tensor, k: int):
        """Backprop K patch groups at a time, with the gradient of one big step.

        1. Forward every group without grad (in chunks of K, BatchNorm running stats untouched)
           to get Z (n, B, d). 2. The loss and dL/dZ on that detached Z (cheap). 3. Re-run the
        encoder K groups at a time with grad and backpropagate dL/dZ_chunk; gradients add up.
        Memory holds one chunk's activations. BatchNorm normalises each chunk with that chunk's
        batch statistics (in both passes, so 1 and 3 agree exactly), and the running averages
        are updated once per chunk; the unchunked step uses the statistics of all n*B patches.
        So the two gradients are equal with BatchNorm in eval mode and differ only through
        those batch statistics in train mode.
        """
        n = patches.shape[0]
        with torch.no_grad(), bn_frozen_stats(self.model):
            z = torch.cat([self.encode(patches[i:i + k]) for i in range(0, n, k)])  # (n, B, d)
        z.requires_grad_(True)
        loss, tcr, inv = self.loss(z)
        (gz,) = torch.autograd.grad(loss, z)  # (n, B, d)
        starts = list(range(0, n, k))
        for j, i in enumerate(starts):
            last = j == len(starts) - 1
            with contextlib.nullcontext() if self.ddp is None or last else self.ddp.no_sync():
                self.encode(patches[i:i + k]).backward(gz[i:i + k])
        return loss.detach(), tcr.detach(), inv.detach()

    def __call__(self, patches: torch.Tensor, lr: float):
        """patches (n, B, 3, S, S) -> (loss, tcr, inv) detached tensors; no host sync."""
        if self._lr is None:
            for g in self.opt.param_groups:
                g["lr"] = lr
        else:  # a device-side fill, no sync; the groups' lr stay put (dynamo guards on them)
            self._lr.fill_(lr)
        if self.cuda_graphs:
            return self._static_step(patches)
        k = self.patch_chunk
        if k and k < patches.shape[0]:
            loss, tcr, inv = self.chunked(patches, k)  # detached
        else:
            loss, tcr, inv = self._forward_loss(patches)
            loss.backward()
            loss, tcr, inv = loss.detach(), tcr.detach(), inv.detach()
        self._update(self._lr)
        self.opt.zero_grad(set_to_none=True)
        return loss, tcr, inv

    # -- the CUDA-graph step
    def _body(self) -> torch.Tensor:
        """One whole step on the static input and lr: what the CUDA graph holds. -> (3,)."""
        loss, tcr, inv = self._forward_loss(self._static_in)
        loss.backward()
        self._update(self._lr)
        return torch.stack([loss.detach(), tcr.detach(), inv.detach()])  # (3,)

    def _static_step(self, patches: torch.Tensor):
        if self._static_in is None or self._static_in.shape != patches.shape:
            self._capture(patches)
        self._static_in.copy_(patches)
        if self._graph is not None:
            self._graph.replay()
        else:  # no CUDA: the same static step, run uncaptured
            self._static_out = self._body()
            self.opt.zero_grad(set_to_none=True)
        out = self._static_out.clone()  # the next replay overwrites the static output
        return out[0], out[1], out[2]

    def _state_tensors(self) -> list[torch.Tensor]:
        """Everything a training step writes: parameters, buffers, optimizer state tensors."""
        state = [t for st in self.opt.state.values() for t in st.values() if torch.is_tensor(t)]
        return [*self.model.parameters(), *self.model.buffers(), *state]

    @torch.no_grad()
    def _capture(self, patches: torch.Tensor) -> None:
        """Warm up (autotuning, compilation, the optimizer state), capture the step as a CUDA
        graph (CUDA only), then put back the state the warm-up steps changed."""
        if not hasattr(self.opt, "init_state"):
            raise TypeError("cuda_graphs needs an optimizer with init_state() (model.lars.LARS)")
        self.opt.init_state()  # the momentum buffers exist before the capture
        tensors = self._state_tensors()
        saved = [t.detach().clone() for t in tensors]
        self._static_in = torch.empty_like(patches)  # keeps make_patches' channels-last strides
        self._static_in.copy_(patches)  # real patches for the warm-up steps
        self.opt.zero_grad(set_to_none=True)
        cuda = patches.device.type == "cuda"
        side = torch.cuda.Stream() if cuda else None
        if cuda:
            side.wait_stream(torch.cuda.current_stream())
        with torch.enable_grad(), torch.cuda.stream(side) if cuda else contextlib.nullcontext():
            for _ in range(self.graph_warmup if cuda else 1):
                self._body()
                self.opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            torch.cuda.empty_cache()  # the warm-up's cached blocks: the graph has its own pool
            self._graph = torch.cuda.CUDAGraph()
            with torch.enable_grad(), torch.cuda.graph(self._graph):
                self._static_out = self._body()  # recorded, not run
        for t, s in zip(tensors, saved):
            t.copy_(s)
