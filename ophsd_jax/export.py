"""Export a training checkpoint as a Hugging Face folder that transformers loads.

    python -m ophsd_jax.export --workdir DIR [--step N] --out HF_DIR [--dtype bfloat16]
"""

from __future__ import annotations

import logging

from absl import app, flags

log = logging.getLogger("ophsd_jax.export")


def export(workdir: str, out: str, *, step: int | None = None, dtype: str | None = None) -> str:
    import jax

    from ophsd_jax import runtime
    from ophsd_jax.checkpointing import CheckpointManager, abstract_like
    from ophsd_jax.distill.step import init_train_state
    from ophsd_jax.models import state as model_state
    from ophsd_jax.models.weights import save_hf

    config = runtime.load_config(workdir)
    mesh = runtime.make_mesh(config)
    cfg, graphdef, params, tok = runtime.load_model(config, mesh)
    state = init_train_state(params, runtime.optimizer(config), mesh)
    ckpt = CheckpointManager(f"{workdir}/checkpoints", async_save=False)
    found = ckpt.restore_latest(abstract_like(state), max_step=step)
    if found is None or (step is not None and found[0] != step):
        raise FileNotFoundError(f"no readable checkpoint{'' if step is None else f' at step {step}'} in "
                                f"{ckpt.directory} (have: {ckpt.steps()})")
    restored_step, state, _, _ = found
    params = state.params
    if dtype:
        params = model_state.cast_params(params, dtype)
        cfg = cfg.replace(param_dtype=dtype)
    if jax.process_index() == 0:
        save_hf(cfg, params, out, tokenizer=tok)
        log.info("exported step %d of %s to %s", restored_step, workdir, out)
    return out


def main(argv):
    del argv
    from ophsd_jax.train import run_cli

    FLAGS = flags.FLAGS
    run_cli(lambda: print(export(FLAGS.workdir, FLAGS.out, step=FLAGS.step, dtype=FLAGS.dtype)), FLAGS.workdir,
            command="export")


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "training work dir", required=True)
    flags.DEFINE_string("out", None, "output folder", required=True)
    flags.DEFINE_integer("step", None, "checkpoint step (default: newest)")
    flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "cast weights before writing")
    app.run(main)
