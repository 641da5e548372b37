"""Train-step benchmark: our jitted OPHSD step vs an equivalent PyTorch eager step (CPU, fp32).

    python -m ophsd_jax.benchmarks.train_step [--batch 4 --student-prompt 256
        --teacher-prompt 768 --response 256 --repeats 3]

Both sides run the same step on the same random SmolLM2-135M-architecture weights
(tied embedding) and the same token batch:

* teacher forward (a frozen copy of the starting weights) on teacher prompt + response,
  no gradient;
* student forward on student prompt + response, with gradient;
* full-vocabulary reverse KL(p_S || p_T) at every response position, computed in
  chunks of `--tile` response tokens, averaged over response tokens;
* backward, global-norm gradient clip (1.0), AdamW (no decay on norms).

Ours is `ophsd_jax.distill.step.TrainStep` (one jitted program, donated state), by default
with `micro_batches=2` (`--micro-batches`): gradient accumulation over two halves of the
batch, the same result as one slice, and faster on the CPU. The PyTorch side is a
`transformers` LlamaForCausalLM run eagerly (SDPA attention). Both first-step losses are
printed and must agree (relative 1e-3): that checks the two programs do the same math.

Throughput `*_tok_s` counts response tokens x batch per second. MFU counts
6 * N * (student sequence tokens) + 2 * N * (teacher sequence tokens) FLOPs per step,
with N = all parameters (the tied embedding/LM head counted once), against this
machine's dense fp32 matmul rate measured in JAX.
"""

from __future__ import annotations

import argparse
import copy
import time

import jax
import jax.numpy as jnp
import numpy as np

from ophsd_jax import parallel
from ophsd_jax.benchmarks.common import cpu_model, emit, matmul_peak_flops
from ophsd_jax.distill.batch import build_pair_batch
from ophsd_jax.distill.step import OptimConfig, StepConfig, TrainStep, init_train_state, make_optimizer
from ophsd_jax.models import state as S
from ophsd_jax.models import weights
from ophsd_jax.models.config import ModelConfig

# Same optimizer settings on both sides. The learning rate only matters for the loss
# check, which uses the first step (before any update).
OPTIM = OptimConfig(learning_rate=1e-5, weight_decay=0.1, grad_clip=1.0)


class IdsTokenizer:
    """A chat 'template' of one BOS-like token, the ids in the message, one generation token:
    prompt lengths are exact, so the sequences fill their buckets with no padding."""

    pad_token_id = 0

    def apply_chat_template(self, messages, add_generation_prompt=True):
        ids = []
        for m in messages:
            ids += [1] + [int(x) for x in m["content"].split()]
        return ids + ([2] if add_generation_prompt else [])


def make_batch(vocab: int, batch: int, student_prompt: int, teacher_prompt: int, response: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    tok = IdsTokenizer()

    def msgs(n):  # n - 2 ids + the 2 template tokens = a prompt of exactly n tokens
        return [{"role": "user", "content": " ".join(map(str, rng.integers(3, vocab, n - 2)))}]

    student = [msgs(student_prompt) for _ in range(batch)]
    teacher = [msgs(teacher_prompt) for _ in range(batch)]
    responses = [rng.integers(3, vocab, response).tolist() for _ in range(batch)]
    buckets = {"student": (student_prompt + response,), "teacher": (teacher_prompt + response,),
               "response": (response,)}
    return build_pair_batch(tok, student, teacher, responses, buckets=buckets, batch_size=batch)


# ---------------------------------------------------------------------------
# Ours.
# ---------------------------------------------------------------------------


def bench_ours(graphdef, params, batch, step_cfg: StepConfig, repeats: int):
    mesh = parallel.single_device_mesh()
    optimizer = make_optimizer(OPTIM)
    teacher = jax.tree.map(jnp.copy, params)  # frozen initial weights; `params` is donated below
    state = init_train_state(params, optimizer, mesh)
    step = TrainStep(graphdef, step_cfg, optimizer, mesh, state)

    t0 = time.perf_counter()
    state, metrics = step(state, teacher, batch)  # compile + first step
    first_loss = float(metrics["loss"])
    compile_and_first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        state, metrics = step(state, teacher, batch)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t0)
    return first_loss, min(times), compile_and_first, step.trace_count


# ---------------------------------------------------------------------------
# PyTorch eager.
# ---------------------------------------------------------------------------


def build_torch_models(cfg: ModelConfig, hf_tensors: dict[str, np.ndarray]):
    import torch
    import transformers

    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg.to_hf()))
    tensors = {k: torch.from_numpy(np.array(v)) for k, v in hf_tensors.items()}  # writable copies
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    model.tie_weights()
    # The tied head is the only weight the checkpoint does not name.
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.train()  # no dropout in Llama; train() only so the student is in its training mode
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    return model, teacher


def torch_step_fn(model, teacher, batch, tile: int):
    """A closure running one eager step; returns the (pre-update) loss."""
    import torch

    def side(s):
        return dict(input_ids=torch.from_numpy(np.asarray(s.tokens, np.int64)),
                    attention_mask=torch.from_numpy(np.asarray(s.attn_mask, np.int64)),
                    position_ids=torch.from_numpy(np.asarray(s.positions, np.int64)))

    s_in, t_in = side(batch.student), side(batch.teacher)
    s_idx = torch.from_numpy(np.asarray(batch.student.resp_index, np.int64))
    t_idx = torch.from_numpy(np.asarray(batch.teacher.resp_index, np.int64))
    mask = torch.from_numpy(np.asarray(batch.resp_mask, np.float32))
    n_tokens = mask.sum().clamp(min=1.0)
    chunk = max(1, tile // mask.shape[0])  # response positions per chunk: ~`tile` tokens, like ours

    decay = [p for n, p in model.named_parameters() if not n.endswith("norm.weight")]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("norm.weight")]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": OPTIM.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=OPTIM.learning_rate, betas=(OPTIM.b1, OPTIM.b2), eps=OPTIM.eps)

    def gather(h, idx):  # [B, L, D] at [B, R] -> [B, R, D]
        return torch.gather(h, 1, idx[..., None].expand(-1, -1, h.shape[-1]))

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            h_t = gather(teacher.model(**t_in).last_hidden_state, t_idx)
        h_s = gather(model.model(**s_in).last_hidden_state, s_idx)
        # Chunked loss: each chunk's [B, chunk, V] logits are built, differentiated into
        # the detached hidden states and the head, and freed before the next chunk; then
        # one backward pass through the transformer. No [tokens, V] array lives at once.
        h_leaf = h_s.detach().requires_grad_()
        loss = torch.zeros(())
        for c in range(0, h_leaf.shape[1], chunk):
            logp = torch.log_softmax(model.lm_head(h_leaf[:, c:c + chunk]), dim=-1)
            with torch.no_grad():
                logq = torch.log_softmax(teacher.lm_head(h_t[:, c:c + chunk]), dim=-1)
            kl = (logp.exp() * (logp - logq)).sum(-1)  # reverse KL(p_S || p_T) per token
            part = (kl * mask[:, c:c + chunk]).sum() / n_tokens
            part.backward()
            loss += part.detach()
        h_s.backward(h_leaf.grad)
        torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM.grad_clip)
        opt.step()
        return float(loss)

    return step


def bench_torch(cfg, hf_tensors, batch, tile: int, repeats: int):
    model, teacher = build_torch_models(cfg, hf_tensors)
    step = torch_step_fn(model, teacher, batch, tile)
    t0 = time.perf_counter()
    first_loss = step()  # doubles as the warm-up
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return first_loss, min(times), first


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--student-prompt", type=int, default=256)
    ap.add_argument("--teacher-prompt", type=int, default=768)
    ap.add_argument("--response", type=int, default=256)
    ap.add_argument("--tile", type=int, default=StepConfig.tile, help="response tokens per loss chunk (both sides)")
    ap.add_argument("--micro-batches", type=int, default=2,
                    help="ours: StepConfig.micro_batches (gradient accumulation over batch slices; same result). "
                         "2 is faster than 1 on the CPU: each slice's per-layer activations stay closer to cache")
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per side (after one warm-up step)")
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="ours: compute dtype (fp32 master weights); MFU is then against that dtype's matmul peak")
    args = ap.parse_args(argv)
    mm_dtype = jnp.dtype(args.dtype)
    mm_n = 2048 if jax.devices()[0].platform == "cpu" else 8192
    B, R = args.batch, args.response

    # The machine is shared: a peak measured while something else runs comes out low and would
    # inflate MFU. So the peak is measured at the start and at the end, and the higher one is used.
    peak_start = matmul_peak_flops(mm_n, mm_dtype)

    cfg = ModelConfig.smollm2_135m(dtype=args.dtype)
    mesh = parallel.single_device_mesh()
    graphdef, params = S.init_params(cfg, mesh, seed=0)
    hf_tensors = weights.to_hf_tensors(cfg, params)  # host copies: ours donates `params`
    batch = make_batch(cfg.vocab_size, B, args.student_prompt, args.teacher_prompt, R)
    Ls, Lt = batch.student.tokens.shape[1], batch.teacher.tokens.shape[1]
    assert batch.resp_mask.shape == (B, R) and batch.resp_mask.all(), "every response token must be scored"

    n_params = cfg.num_params()
    student_tokens, teacher_tokens = B * Ls, B * Lt
    flops = 6 * n_params * student_tokens + 2 * n_params * teacher_tokens
    print(f"model: SmolLM2-135M architecture, random weights, fp32; N = {n_params:,} parameters "
          f"(all, tied embedding/head counted once)")
    print(f"batch {B}: student {Ls} tokens/row ({args.student_prompt} prompt + {R} response), teacher {Lt} "
          f"tokens/row ({args.teacher_prompt} prompt + {R} response); loss over {B * R} response tokens")
    print(f"MFU FLOPs/step = 6*N*{student_tokens} (student tokens) + 2*N*{teacher_tokens} (teacher tokens) "
          f"= {flops / 1e12:.3f} TFLOP (the usual 6ND/2ND estimate: it counts the tied head on every token, though "
          f"it runs on response positions only, and leaves out attention score FLOPs)")

    step_cfg = StepConfig(tile=args.tile, micro_batches=args.micro_batches)
    ours_loss, ours_t, ours_first, traces = bench_ours(graphdef, params, batch, step_cfg, args.repeats)
    ours_tok_s = B * R / ours_t
    print(f"ours : first-step loss {ours_loss:.6f}  step {ours_t:.3f} s (best of {args.repeats}; compile + first "
          f"step {ours_first:.1f} s, {traces} trace; micro_batches={step_cfg.micro_batches}, tile={step_cfg.tile}, "
          f"vocab_tile={step_cfg.vocab_tile})  {ours_tok_s:.1f} response tok/s  {flops / ours_t / 1e9:.1f} GFLOP/s")

    torch_t = torch_tok_s = speedup = None
    if not args.skip_torch:
        import torch

        torch_loss, torch_t, torch_first = bench_torch(cfg, hf_tensors, batch, args.tile, args.repeats)
        torch_tok_s = B * R / torch_t
        speedup = torch_t / ours_t
        print(f"torch: first-step loss {torch_loss:.6f}  step {torch_t:.3f} s (best of {args.repeats}; first "
              f"step {torch_first:.1f} s, torch {torch.__version__}, {torch.get_num_threads()} threads)  "
              f"{torch_tok_s:.1f} response tok/s  {flops / torch_t / 1e9:.1f} GFLOP/s")
        rel = abs(ours_loss - torch_loss) / abs(torch_loss)
        print(f"first-step loss relative difference: {rel:.2e}")
        assert rel < 1e-3, f"losses disagree: ours {ours_loss} vs torch {torch_loss}"

    peak_end = matmul_peak_flops(mm_n, mm_dtype)
    peak = max(peak_start, peak_end)
    mfu = flops / ours_t / peak
    print(f"host CPU: {cpu_model()}; device: {jax.devices()[0].device_kind}")
    print(f"dense {mm_dtype.name} matmul peak (JAX, {mm_n}^3 best of 5): start {peak_start / 1e9:.1f}, end {peak_end / 1e9:.1f} "
          f"-> {peak / 1e9:.1f} GFLOP/s  (jax {jax.__version__}, {jax.devices()[0].platform})")
    print(f"ours MFU = {flops / 1e12:.3f} TFLOP / {ours_t:.3f} s / {peak / 1e9:.1f} GFLOP/s = {mfu:.3f}")
    emit({"bench": "train_step", "ours_tok_s": round(ours_tok_s, 2),
          "torch_tok_s": None if torch_tok_s is None else round(torch_tok_s, 2),
          "speedup": None if speedup is None else round(speedup, 3), "mfu": round(mfu, 4),
          "ours_step_s": round(ours_t, 3), "torch_step_s": None if torch_t is None else round(torch_t, 3),
          "peak_gflops": round(peak / 1e9, 1), "n_params": n_params, "micro_batches": step_cfg.micro_batches,
          "batch": B, "dtype": args.dtype, "cpu": cpu_model(), "device": jax.devices()[0].device_kind,
          "student_tokens": Ls, "teacher_tokens": Lt, "response_tokens": R})


if __name__ == "__main__":
    main()
