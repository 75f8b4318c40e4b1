"""Pipeline-parallel schedules: 1F1B (one forward, one backward) and plain gradient accumulation.

Entry point (Megatron-style, the trainer codes against exactly this)::

    reports = forward_backward(forward_step, model, micro_batches, grid,
                               forward_only=False, tensor_shape=None, dtype=torch.float32)

`forward_step(model, micro_batch, input_tensor) -> (output_tensor, loss_fn)`:
  * `input_tensor` is None on the first stage (the stage reads `micro_batch` itself), else the
    hidden states received from the previous stage (a leaf with `requires_grad` when training);
  * on the last stage `loss_fn(output_tensor) -> (loss_for_backward, report)`; the schedule calls
    backward on `loss_for_backward` **as is** (no division by the number of micro-batches: the
    stage's loss function decides the normalisation, e.g. tokens of the whole global batch) and
    returns the `report` dicts of all micro-batches, in order, on the last stage (empty list on
    the other stages). On other stages `loss_fn` is never called.

Every pipeline stage receives the same `micro_batches` list (same length, same order): the middle
stages need the attention mask / position ids anyway, and the receive shape of micro-batch `i` is
derived from `micro_batches[i]["tokens"].shape` (so micro-batches may differ in length, e.g.
packed SFT with a per-batch cutoff).

Shapes on the wire: `tensor_shape` if given (all micro-batches), else
`model.stage_output_shape(micro_batch_size, seq_length)` of this stage's (unwrapped) model. That
shape must be the boundary hidden-state shape, identical on every stage (the sending and the
receiving stage each compute it locally, Megatron's fixed `tensor_shape` convention), and the
tensors are sent in `dtype` (the compute dtype). A mismatch raises with both shapes named rather
than hanging or corrupting memory.

Why our own schedule rather than `torch.distributed.pipelining`: its schedules take a
`loss_fn(output, target)` with one target tensor and return only losses, whereas our stages build
a different loss closure per micro-batch (the diffusion noise, masks and the per-micro-batch
report dict come from the micro-batch itself, and GRPO's last stage returns per-token
log-probs); its `PipelineStage` also wants shape inference by a meta forward and owns the model
split. Megatron's 1F1B is ~150 lines on top of isend/irecv, runs unchanged on gloo and NCCL, and
keeps the trainer's interface exactly Megatron's.

Communication: point-to-point `isend`/`irecv` on `grid.pp_group` with the global ranks
`grid.next_rank` / `grid.prev_rank`; all operations of one exchange are posted before any is
waited on, in Megatron's even/odd order, so paired send/receive exchanges between neighbours
cannot deadlock (gloo sends block until the peer receives).

Not implemented: interleaved virtual stages (Megatron's `--num-layers-per-virtual-pipeline-stage`).
They shrink the bubble by the number of chunks but use the wrap-around neighbour pair and
four-way exchanges, whose NCCL ordering we could not test without GPUs; a list of more than one
model chunk raises NotImplementedError. The 7B recipe runs PP=1.

Gradient accumulation with DDP-style wrappers: if the model has a `no_sync()` context manager,
every backward but the last one runs inside it, so a data-parallel wrapper all-reduces once.
Gradients of tied input/output embeddings split over the first and last stages are NOT summed
here (the trainer does that over `grid.embedding_group` after the schedule).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist

ForwardStep = Callable[[torch.nn.Module, dict, Optional[torch.Tensor]], tuple]
Shape = tuple[int, ...]

__all__ = ["forward_backward", "forward_backward_no_pipelining", "forward_backward_pipelining_1f1b",
           "P2P"]


# ---------------------------------------------------------------------------------------- entry
def forward_backward(forward_step: ForwardStep, model: torch.nn.Module, micro_batches: Sequence[dict], grid,
                     *, forward_only: bool = False, tensor_shape: Optional[Sequence[int]] = None,
                     dtype: torch.dtype = torch.float32) -> list[dict]:
    """Run forward (and backward unless `forward_only`) over all micro-batches; see module doc.

    With `forward_only` the forwards run under `torch.no_grad()` (evaluation, GRPO old/ref
    log-probs). Returns the last stage's reports (empty list on other pipeline stages).
    """
    if isinstance(model, (list, tuple)):  # Megatron passes a list of model chunks
        if len(model) != 1:
            raise NotImplementedError(f"got {len(model)} model chunks: interleaved virtual pipeline stages are not "
                                      f"implemented; build one chunk per pipeline stage")
        model = model[0]
    micro_batches = list(micro_batches)
    if not micro_batches:
        raise ValueError("forward_backward: micro_batches is empty; pass at least one micro-batch dict")
    if int(getattr(grid, "pp_size", 1)) <= 1:
        return forward_backward_no_pipelining(forward_step, model, micro_batches, forward_only=forward_only)
    return forward_backward_pipelining_1f1b(forward_step, model, micro_batches, grid, forward_only=forward_only,
                                            tensor_shape=tensor_shape, dtype=dtype)


def forward_backward_no_pipelining(forward_step: ForwardStep, model: torch.nn.Module, micro_batches: Sequence[dict],
                                   *, forward_only: bool = False) -> list[dict]:
    """One stage: micro-batches one after the other, gradients accumulate in `.grad`."""
    reports: list[dict] = []
    n = len(micro_batches)
    for i, mb in enumerate(micro_batches):
        with _grad_mode(forward_only), _maybe_no_sync(model, enabled=not forward_only and i < n - 1):
            output, loss_fn = forward_step(model, mb, None)
            loss, report = _call_loss_fn(loss_fn, output, i)
            if not forward_only:
                torch.autograd.backward(loss)
        reports.append(_detach_report(report))
    return reports


# ---------------------------------------------------------------------------------------- 1F1B
def forward_backward_pipelining_1f1b(forward_step: ForwardStep, model: torch.nn.Module,
                                     micro_batches: Sequence[dict], grid, *, forward_only: bool = False,
                                     tensor_shape: Optional[Sequence[int]] = None,
                                     dtype: torch.dtype = torch.float32) -> list[dict]:
    """Megatron's non-interleaved 1F1B: warm-up forwards, steady 1F1B, cool-down backwards.

    Stage r runs `min(pp - r - 1, M)` warm-up forwards, so at most `pp - r` micro-batches'
    activations are alive on it at any time (vs M for all-forward-then-all-backward).
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("pipeline parallelism (pp_size > 1) needs torch.distributed initialised")
    M = len(micro_batches)
    p2p = P2P(grid, dtype, _shape_fn(model, micro_batches, tensor_shape))
    first, last = grid.is_first_stage, grid.is_last_stage
    num_warmup = min(grid.pp_size - grid.pp_rank - 1, M)
    num_steady = M - num_warmup
    reports: list[dict] = []
    inputs: list[Optional[torch.Tensor]] = []
    outputs: list[Any] = []
    bwd_index = 0  # next micro-batch to run backward for

    def fwd(i: int, inp: Optional[torch.Tensor]) -> Any:
        return _forward(forward_step, model, micro_batches[i], inp, i, last, reports, forward_only)

    def bwd(inp: Optional[torch.Tensor], out: Any, out_grad: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        nonlocal bwd_index
        with _maybe_no_sync(model, enabled=bwd_index < M - 1):
            grad = _backward(inp, out, out_grad)
        bwd_index += 1
        return grad

    with _grad_mode(forward_only):
        for i in range(num_warmup):  # warm-up: forwards only
            inp = None if first else p2p.recv_forward(i)
            out = fwd(i, inp)
            if not last:
                p2p.send_forward(out, i)
            if not forward_only:
                inputs.append(inp)
                outputs.append(out)

        inp = None if (first or num_steady == 0) else p2p.recv_forward(num_warmup)
        for k in range(num_steady):  # steady state: one forward, one backward
            i = num_warmup + k
            is_last_steady = k == num_steady - 1
            out = fwd(i, inp)
            if forward_only:
                if not last:
                    p2p.send_forward(out, i)
                inp = None if (first or is_last_steady) else p2p.recv_forward(i + 1)
                continue
            inputs.append(inp)
            outputs.append(out)
            # the gradient that comes back is for the OLDEST micro-batch in flight, not for `out`
            out_grad = None if last else p2p.send_forward_recv_backward(out, i, grad_shape=outputs[0].shape)
            in_grad = bwd(inputs.pop(0), outputs.pop(0), out_grad)
            if is_last_steady:
                inp = None
                if not first:
                    p2p.send_backward(in_grad)
            elif first:
                inp = None
            else:
                inp = p2p.send_backward_recv_forward(in_grad, i + 1)

        if not forward_only:
            for _ in range(num_warmup):  # cool-down: the warm-up micro-batches' backwards
                inp, out = inputs.pop(0), outputs.pop(0)
                out_grad = None if last else p2p.recv_backward(out)
                in_grad = bwd(inp, out, out_grad)
                if not first:
                    p2p.send_backward(in_grad)
    return reports if last else []


def _forward(forward_step: ForwardStep, model: torch.nn.Module, mb: dict, inp: Optional[torch.Tensor], index: int,
             last: bool, reports: list[dict], forward_only: bool) -> Any:
    """One micro-batch forward; on the last stage returns the loss to backward from."""
    output, loss_fn = forward_step(model, mb, inp)
    if not last:
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"forward_step returned {type(output).__name__} for micro-batch {index} on a "
                            f"non-last pipeline stage; it must return the hidden-states tensor to send")
        return output
    loss, report = _call_loss_fn(loss_fn, output, index)
    reports.append(_detach_report(report))
    return None if forward_only else loss


def _backward(inp: Optional[torch.Tensor], out: torch.Tensor, out_grad: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Backward of one micro-batch on this stage; returns the gradient w.r.t. the received input."""
    if out_grad is None:  # last stage: `out` is the scalar loss
        torch.autograd.backward(out)
    else:
        torch.autograd.backward(out, grad_tensors=out_grad.to(out.dtype))
    if inp is None:
        return None
    if inp.grad is None:  # stage ignored its input: send zeros so the previous stage still backprops
        return torch.zeros_like(inp)
    return inp.grad


def _call_loss_fn(loss_fn: Callable, output: Any, index: int) -> tuple[torch.Tensor, dict]:
    result = loss_fn(output)
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], dict)):
        raise TypeError(f"loss_fn of micro-batch {index} must return (loss_for_backward, report: dict), "
                        f"got {type(result).__name__}")
    loss, report = result
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError(f"loss_fn of micro-batch {index}: loss_for_backward must be a scalar tensor, "
                        f"got {getattr(loss, 'shape', type(loss).__name__)}")
    return loss, report


def _detach_report(report: dict) -> dict:
    return {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in report.items()}


def _grad_mode(forward_only: bool):
    return torch.no_grad() if forward_only else contextlib.nullcontext()


def _maybe_no_sync(model: Any, enabled: bool):
    no_sync = getattr(model, "no_sync", None)
    return no_sync() if (enabled and callable(no_sync)) else contextlib.nullcontext()


def _unwrap(model: Any) -> Any:
    """Through DDP / fp16 wrappers (`.module` chains) to the stage model."""
    seen = 0
    while not hasattr(model, "stage_output_shape") and hasattr(model, "module") and seen < 8:
        model, seen = model.module, seen + 1
    return model


def _shape_fn(model: Any, micro_batches: Sequence[dict], tensor_shape: Optional[Sequence[int]]) -> Callable[[int], Shape]:
    """Micro-batch index -> the boundary tensor shape (sent by the previous stage / by us)."""
    if tensor_shape is not None:
        fixed = tuple(int(s) for s in tensor_shape)
        return lambda i: fixed
    stage = _unwrap(model)
    if not hasattr(stage, "stage_output_shape"):
        raise ValueError(f"{type(stage).__name__} has no stage_output_shape(micro_batch_size, seq_length): "
                         f"pass tensor_shape= to forward_backward")
    cache: dict[tuple[int, int], Shape] = {}

    def shape(i: int) -> Shape:
        mb = micro_batches[i]
        if "tokens" not in mb:
            raise KeyError(f"micro-batch {i} has no 'tokens' (keys: {sorted(mb)}); the pipeline derives the "
                           f"receive shape from it, or pass tensor_shape=")
        b, s = mb["tokens"].shape[:2]
        if (b, s) not in cache:
            cache[(b, s)] = tuple(int(x) for x in stage.stage_output_shape(b, s))
        return cache[(b, s)]
    return shape


# ---------------------------------------------------------------------------------------- p2p
class P2P:
    """Neighbour exchanges of one pipeline stage (Megatron's p2p_communication, isend/irecv).

    Each method posts all of its operations, then waits for them all. Even pipeline ranks post
    sends before receives, odd ranks receives before sends (Megatron's order), which keeps
    transports that pair operations in posting order (gloo, NCCL) deadlock-free.
    """

    def __init__(self, grid, dtype: torch.dtype, shape_of: Callable[[int], Shape]):
        self.grid, self.dtype, self.shape_of = grid, dtype, shape_of
        self.group = grid.pp_group
        self.next, self.prev = grid.next_rank, grid.prev_rank
        self.even = grid.pp_rank % 2 == 0
        self.device = _comm_device(self.group)

    # the public verbs, named as in Megatron
    def recv_forward(self, index: int) -> torch.Tensor:
        return self._exchange(recv_prev=self.shape_of(index))[0]

    def send_forward(self, output: torch.Tensor, index: int) -> None:
        self._exchange(send_next=self._check_shape(output, index))

    def recv_backward(self, output: torch.Tensor) -> torch.Tensor:
        return self._exchange(recv_next=tuple(output.shape))[1]

    def send_backward(self, grad: torch.Tensor) -> None:
        self._exchange(send_prev=grad)

    def send_forward_recv_backward(self, output: torch.Tensor, index: int, grad_shape: Sequence[int]) -> torch.Tensor:
        return self._exchange(send_next=self._check_shape(output, index), recv_next=tuple(grad_shape))[1]

    def send_backward_recv_forward(self, grad: torch.Tensor, index: int) -> torch.Tensor:
        return self._exchange(send_prev=grad, recv_prev=self.shape_of(index))[0]

    # the one primitive
    def _exchange(self, send_next: Optional[torch.Tensor] = None, recv_prev: Optional[Shape] = None,
                  send_prev: Optional[torch.Tensor] = None, recv_next: Optional[Shape] = None):
        from_prev = self._buffer(recv_prev, requires_grad=torch.is_grad_enabled()) if recv_prev else None
        from_next = self._buffer(recv_next, requires_grad=False) if recv_next else None
        if send_next is not None:
            send_next = self._check_send(send_next, "forward (to the next stage)")
        if send_prev is not None:
            send_prev = self._check_send(send_prev, "backward (to the previous stage)")
        ops: list[tuple[Callable, torch.Tensor, int]] = []
        sends = [(dist.isend, t, peer) for t, peer in ((send_next, self.next), (send_prev, self.prev)) if t is not None]
        recvs = [(dist.irecv, t, peer) for t, peer in ((from_prev, self.prev), (from_next, self.next)) if t is not None]
        ops = sends + recvs if self.even else recvs + sends
        works = [op(tensor, peer, group=self.group) for op, tensor, peer in ops]
        for w in works:
            w.wait()
        return from_prev, from_next

    def _check_shape(self, output: torch.Tensor, index: int) -> torch.Tensor:
        # the next stage allocates shape_of(index) from its own copy of the micro-batch: a
        # different shape here would hang or garble the receive, so fail loudly on the sender
        expected = self.shape_of(index)
        if tuple(output.shape) != tuple(expected):
            raise RuntimeError(
                f"pipeline stage {self.grid.pp_rank}: micro-batch {index} output has shape {tuple(output.shape)} "
                f"but the next stage expects {tuple(expected)} (tensor_shape= or model.stage_output_shape); "
                f"make stage_output_shape return the hidden-state shape this stage sends")
        return output

    def _buffer(self, shape: Shape, requires_grad: bool) -> torch.Tensor:
        # received activations are leaves of this stage's graph: their .grad is what goes back
        return torch.empty(shape, dtype=self.dtype, device=self.device, requires_grad=requires_grad)

    def _check_send(self, t: torch.Tensor, what: str) -> torch.Tensor:
        t = t.detach()
        if t.dtype != self.dtype:
            t = t.to(self.dtype)  # the wire dtype is fixed on both sides
        return t.contiguous()


def _comm_device(group) -> torch.device:
    """CUDA for NCCL groups (current device), CPU otherwise."""
    try:
        backend = dist.get_backend(group)
    except Exception:  # noqa: BLE001 - older torch / None group: assume the default backend
        backend = dist.get_backend()
    if "nccl" in str(backend).lower() and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def iter_pipeline_phases(pp_size: int, pp_rank: int, num_micro_batches: int) -> Iterator[tuple[str, int]]:
    """The (phase, micro-batch) order 1F1B runs on one stage: documents/tests the schedule shape."""
    warm = min(pp_size - pp_rank - 1, num_micro_batches)
    for i in range(warm):
        yield "F", i
    b = 0
    for i in range(warm, num_micro_batches):
        yield "F", i
        yield "B", b
        b += 1
    for _ in range(warm):
        yield "B", b
        b += 1
