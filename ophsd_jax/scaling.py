"""Per-device memory estimate of a training config on a mesh, from the code's own
shapes and sharding rules (no devices or weights needed).

    python -m ophsd_jax.scaling [--prompts_per_step 64] [--micro_batches 8]

For Qwen3-8B at the paper configs' sequence lengths (math, lawbench, uspto), prints,
for each mesh in `MESHES`, bytes per device for: parameters (fp32 master),
Adam moments, gradients, the frozen teacher copy, the rollout KV cache, layer-boundary
activations kept under remat, and the tiled loss buffers.
"""

from __future__ import annotations

import argparse
import dataclasses
import math

from ophsd_jax import parallel
from ophsd_jax.models.config import ModelConfig, as_dtype
from ophsd_jax.models.transformer import layer_param_specs

GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class MeshShape:
    """Mesh axis sizes only: enough for `parallel.logical_to_spec` (no devices)."""

    data: int
    fsdp: int
    tensor: int

    @property
    def shape(self) -> dict:
        return {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}

    @property
    def size(self) -> int:
        return self.data * self.fsdp * self.tensor


# name -> (chips, mesh). v5p-64 = 32 chips, v4-32 = 16 chips (TPU names count cores).
MESHES = {
    "v5p-64 (32 chips), fsdp=32": MeshShape(1, 32, 1),
    "v4-32 (16 chips), fsdp=16": MeshShape(1, 16, 1),
    "v4-32 (16 chips), fsdp=8 tensor=2": MeshShape(1, 8, 2),
    "8xH100, fsdp=8": MeshShape(1, 8, 1),
    "8xH100, fsdp=4 tensor=2": MeshShape(1, 4, 2),
}


def _param_shapes(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    V, D = cfg.vocab_size, cfg.hidden_size
    shapes = {f"layers.{k}": v for k, v in layer_param_specs(cfg).items()}
    shapes["embed"] = ((V, D), ("vocab", "embed"))
    shapes["final_norm"] = ((D,), ("norm",))
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = ((D, V), ("embed", "vocab"))
    return shapes


def sharded_elements(cfg: ModelConfig, mesh: MeshShape) -> int:
    """Parameter elements held by one device under the rules table."""
    total = 0
    for shape, axes in _param_shapes(cfg).values():
        spec = parallel.logical_to_spec(axes, shape, mesh)
        n = 1
        for dim, part in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
            parts = (part,) if isinstance(part, str) else tuple(part or ())
            n *= dim // math.prod(mesh.shape[p] for p in parts)
        total += n
    return total


def estimate(cfg: ModelConfig, mesh: MeshShape, *, prompts_per_step: int, micro_batches: int,
             prompt_len: int, response_len: int, teacher_len: int, sampler_batch: int, loss_tile: int,
             teacher_frozen: bool = True) -> dict[str, float]:
    """Bytes per device (see module docstring). Activations assume per-layer remat."""
    pbytes = as_dtype(cfg.param_dtype).itemsize
    cbytes = as_dtype(cfg.dtype).itemsize
    elems = sharded_elements(cfg, mesh)
    batch_shards = mesh.data * mesh.fsdp
    rows = max(prompts_per_step // micro_batches // batch_shards, 1)  # sequences per device per micro-batch
    kv_heads = cfg.num_kv_heads // mesh.tensor if cfg.num_kv_heads % mesh.tensor == 0 else cfg.num_kv_heads
    sampler_rows = max(sampler_batch // batch_shards, 1)
    cache_slots = teacher_len  # harness prompts are the longest generation contexts
    out = {
        "params": elems * pbytes,
        "adam_moments": 2 * elems * pbytes,
        "gradients": elems * pbytes,
        "teacher_copy": elems * cbytes if teacher_frozen else 0,
        "rollout_kv_cache": 2 * cfg.num_layers * sampler_rows * cache_slots * kv_heads * cfg.head_dim * cbytes,
        # remat keeps one [rows, T, D] per layer for student and teacher passes
        "activations_remat": cfg.num_layers * rows * (prompt_len + response_len + teacher_len) * cfg.hidden_size
        * cbytes,
        # tiled loss: [tile, V] fp32 student + teacher logits and a few per-token vectors
        "loss_tiles": 3 * loss_tile * cfg.vocab_size * 4,
    }
    out["total"] = sum(out.values())
    return out


def report(cfg: ModelConfig, meshes: dict[str, MeshShape], **kw) -> str:
    lines = [f"model: {cfg.family} {cfg.num_params() / 1e9:.2f}B params, param {cfg.param_dtype}, compute {cfg.dtype}",
             "settings: " + ", ".join(f"{k}={v}" for k, v in kw.items()), ""]
    keys = None
    for name, mesh in meshes.items():
        est = estimate(cfg, mesh, **kw)
        keys = keys or list(est)
        if len(lines) == 3:
            lines.append(f"{'mesh':36s}" + "".join(f"{k:>18s}" for k in keys))
        lines.append(f"{name:36s}" + "".join(f"{est[k] / GiB:>15.2f}GiB" for k in keys))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts_per_step", type=int, default=64)
    ap.add_argument("--micro_batches", type=int, default=8)
    args = ap.parse_args(argv)
    cfg = ModelConfig.qwen3_8b(param_dtype="float32", dtype="bfloat16", remat=True)
    settings = {"math": (4096, 8192, 12288), "lawbench": (4096, 2048, 8192), "uspto": (1024, 2048, 6144)}
    for task, (prompt, response, teacher_total) in settings.items():
        print(f"== {task}: prompt {prompt}, response {response}, teacher context + response {teacher_total}")
        print(report(cfg, MESHES, prompts_per_step=args.prompts_per_step, micro_batches=args.micro_batches,
                     prompt_len=prompt, response_len=response, teacher_len=teacher_total, sampler_batch=64,
                     loss_tile=256))
        print()


if __name__ == "__main__":
    main()
