"""Export a training checkpoint as a Hugging Face folder that transformers loads.

    python -m ophsd_jax.export --workdir DIR [--step N] --out HF_DIR [--dtype bfloat16] [--peft_out DIR]

A LoRA run (config.lora.rank > 0) exports the base weights with the adapter merged in;
`--peft_out` also writes the adapter alone as a PEFT adapter folder.
"""

from __future__ import annotations

import logging

from absl import app, flags

log = logging.getLogger("ophsd_jax.export")


def export(workdir: str, out: str, *, step: int | None = None, dtype: str | None = None,
           peft_out: str | None = None) -> str:
    """Write the checkpoint's full weights to `out` (LoRA: base + adapter merged) and, for a
    LoRA run, optionally the adapter alone in the PEFT layout to `peft_out`."""
    import jax

    from ophsd_jax import runtime
    from ophsd_jax.checkpointing import CheckpointManager, abstract_like
    from ophsd_jax.distill.step import init_train_state
    from ophsd_jax.models import state as model_state
    from ophsd_jax.models.weights import save_hf

    config = runtime.load_config(workdir)
    mesh = runtime.make_mesh(config)
    cfg, graphdef, params, tok = runtime.load_model(config, mesh)
    lcfg = runtime.lora_config(config)
    trained, _ = runtime.trainable_params(config, cfg, params, mesh, abstract=True)  # restore target
    state = init_train_state(trained, runtime.optimizer(config), mesh)
    ckpt = CheckpointManager(f"{workdir}/checkpoints", async_save=False)
    found = ckpt.restore_latest(abstract_like(state), max_step=step)
    if found is None or (step is not None and found[0] != step):
        raise FileNotFoundError(f"no readable checkpoint{'' if step is None else f' at step {step}'} in "
                                f"{ckpt.directory} (have: {ckpt.steps()})")
    restored_step, state, _, _ = found
    if lcfg is not None:  # merged full weights: the base (from its source) + the trained adapter
        from ophsd_jax.models import lora

        if peft_out and jax.process_index() == 0:
            lora.save_peft(cfg, lcfg, state.params, peft_out, base_model=config.model.path)
            log.info("wrote the step %d adapter in the PEFT layout to %s", restored_step, peft_out)
        params = lora.make_merge(params)(params, state.params, lcfg.scale)
    else:
        if peft_out:
            raise ValueError(f"--peft_out: {workdir} trained all weights (config.lora.rank=0): no adapter to export")
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
    run_cli(lambda: print(export(FLAGS.workdir, FLAGS.out, step=FLAGS.step, dtype=FLAGS.dtype,
                                      peft_out=FLAGS.peft_out or None)), FLAGS.workdir,
            command="export")


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "training work dir", required=True)
    flags.DEFINE_string("out", None, "output folder", required=True)
    flags.DEFINE_integer("step", None, "checkpoint step (default: newest)")
    flags.DEFINE_string("peft_out", "", "LoRA runs: also write the adapter alone here (PEFT layout: "
                        "adapter_config.json + adapter_model.safetensors)")
    flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "cast weights before writing")
    app.run(main)
