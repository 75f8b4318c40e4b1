#!/usr/bin/env bash
# One GPU check of the scale-readiness work (issue 16), < 8 minutes on one H200, no network:
#   1. pytest -m gpu (TE tests skip without Transformer Engine)            <= 240 s
#   2. a 7B-shaped layer stack (2 layers of diffucoder-7b, seq 4096, micro-batch 1, local impl)
#      forward+backward steps in bf16, torch-native FP8 (model/fp8.py), and TE bf16/FP8 if importable
#   3. single-rank NCCL: MixedPrecisionAdamW steps, DCP save, resume into a fresh model/optimizer,
#      bit-exact comparison of parameters and Adam state
#   4. one table: tok/s, achieved TFLOP/s, MFU against the measured matmul peak (training/peak.py:
#      8192^3 bf16, CUDA events) and against the datasheet peak, peak memory
# Wheels the GPU machine lacks (it has torch 2.11 + CUDA 13, Python 3.12): put them in $WHEELS
# (default ./wheels); they are installed offline with --no-index.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-wheels}
if [ -d "$WHEELS" ]; then
  python -m pip install -q --no-index --find-links "$WHEELS" -r <(ls "$WHEELS" | sed 's/-[0-9].*//' | sort -u) || true
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
echo "== 1. pytest -m gpu"
timeout 240 python -m pytest -q -p no:cacheprovider -m gpu tests/model tests/training || status=1
echo "== 2-4. 7B layer stack, NCCL save/resume"
timeout 200 python - <<'PY' || status=1
import os, tempfile, time, importlib.util
import torch, torch.distributed as dist
from megatron_diffu.model.config import TransformerConfig
from megatron_diffu.model.transformer import DiffusionTransformer
from megatron_diffu.model import fp8
from megatron_diffu.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_diffu.training.peak import measure_peak_flops, datasheet_peak_flops

dev = torch.device("cuda")
name = torch.cuda.get_device_name(dev)
peak = measure_peak_flops(dev, torch.bfloat16)
sheet = datasheet_peak_flops(name, torch.bfloat16)
S, B, L = 4096, 1, 2
rows = []

def bench(label, impl="local", native_fp8=False, te_fp8=None, iters=5):
    cfg = TransformerConfig.from_preset("diffucoder-7b", num_layers=L, transformer_impl=impl, fp8_format=te_fp8,
                                        recompute_granularity="selective")
    model = DiffusionTransformer(cfg, device=dev, init_weights=False).train()
    with torch.no_grad():  # a fast on-device init (the seeded CPU init of 1.6e9 weights is slow)
        for n, p in model.named_parameters():
            p.fill_(1.0) if n.endswith("layernorm.weight") or "layer_norm" in n else p.normal_(0.0, 0.02)
    if native_fp8:
        fp8.enable_fp8(model, fp8.Fp8Recipe("hybrid"))
    ids = torch.randint(0, cfg.vocab_size, (B, S), device=dev)
    pos = torch.rand(B, S, device=dev) < 0.5
    torch.cuda.reset_peak_memory_stats(dev)
    def step():
        out = model(ids, logit_positions=pos)
        vocab_parallel_cross_entropy(out.float(), ids[pos]).mean().backward()
        for p in model.parameters():
            p.grad = None
    step(); step(); torch.cuda.synchronize(dev)
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0.record()
    for _ in range(iters):
        step()
    t1.record(); t1.synchronize()
    dt = t0.elapsed_time(t1) / 1e3 / iters
    flops = cfg.step_flops(B * S, pos.sum().item(), S, 3.0)
    rows.append((label, B * S / dt, flops / dt / 1e12, flops / dt / peak, flops / dt / sheet if sheet else float("nan"),
                 torch.cuda.max_memory_allocated(dev) / 1e9))
    del model; torch.cuda.empty_cache()

bench("bf16 local")
bench("fp8 torch-native (hybrid)", native_fp8=True)
if importlib.util.find_spec("transformer_engine") is not None:
    bench("bf16 transformer_engine", impl="transformer_engine")
    bench("fp8 transformer_engine (hybrid)", impl="transformer_engine", te_fp8="hybrid")

# single-rank NCCL save / resume
os.environ.setdefault("MASTER_ADDR", "127.0.0.1"); os.environ.setdefault("MASTER_PORT", "29533")
dist.init_process_group("nccl", rank=0, world_size=1, device_id=dev)
from megatron_diffu.parallel.state import ProcessGrid
from megatron_diffu.training import checkpointing
from megatron_diffu.training.config import OptimizerConfig
from megatron_diffu.training.optimizer import MixedPrecisionAdamW
grid = ProcessGrid.build(1, 1)
cfg = TransformerConfig.from_preset("tiny", hidden_size=256, ffn_hidden_size=512, vocab_size=512, bf16=True)
class RC:
    def save_yaml(self, p):
        import yaml, dataclasses
        yaml.safe_dump({"model": {k: v for k, v in dataclasses.asdict(cfg).items()}}, open(p, "w"))
def trained():
    m = DiffusionTransformer(cfg, grid=grid, device=dev)
    o = MixedPrecisionAdamW(m, OptimizerConfig(), grid, use_distributed_optimizer=True)
    return m, o
m, o = trained()
ids = torch.randint(0, 512, (2, 64), device=dev)
for _ in range(3):
    o.zero_grad(); vocab_parallel_cross_entropy(m(ids).float().view(-1, 512), ids.view(-1)).mean().backward()
    o.reduce_gradients(); o.step(1e-3, o.grad_norm())
tmp = tempfile.mkdtemp()
checkpointing.save_checkpoint(tmp, 3, m, o, grid, RC(), {"iteration": 3, "optimizer_step": o.step_count})
m2, o2 = trained()
checkpointing.load_checkpoint(tmp, m2, o2, grid, cfg)
same = all(torch.equal(getattr(o, k), getattr(o2, k)) for k in ("exp_avg", "exp_avg_sq", "master")) and \
       all(torch.equal(a, b) for a, b in zip(m.parameters(), m2.parameters()))
dist.destroy_process_group()

print(f"\n{name}: measured bf16 matmul peak {peak / 1e12:.0f} TFLOP/s (datasheet {sheet / 1e12 if sheet else float('nan'):.0f})")
print(f"{'run (2 x 7B layers, seq 4096)':<34} {'tok/s':>9} {'TFLOP/s':>8} {'MFU meas':>9} {'MFU sheet':>9} {'mem GB':>7}")
for r in rows:
    print(f"{r[0]:<34} {r[1]:>9.0f} {r[2]:>8.1f} {100 * r[3]:>8.1f}% {100 * r[4]:>8.1f}% {r[5]:>7.1f}")
print(f"NCCL single-rank save/resume bit-exact: {same}")
raise SystemExit(0 if same else 1)
PY
echo "gpu_check: $([ $status = 0 ] && echo PASS || echo FAIL)"
exit $status
