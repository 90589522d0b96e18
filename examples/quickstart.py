#!/usr/bin/env python
"""The whole pipeline on the bundled HH slice, on CPU, in minutes.

1. a sentencepiece tokenizer trained on the slice, and a tiny random Llama in Hugging Face format;
2. HF -> Megatron conversion; preprocessing (train / held-out split) and prompt embeddings;
3. a supervised warm-up on the chosen responses (a random model has no preferences to align);
4. RPO from the warmed-up model (online reference, the contrast matrix over both ranks);
5. held-out evaluation before and after RPO; export to Hugging Face; one reply from transformers.

Every training stage runs ``python -m megatron_rpo.train`` under torchrun with 2 processes on
CPU; on a CUDA machine with one process per GPU, up to 2 (NCCL cannot share one GPU between two
ranks), and it says what it chose. ``--nproc`` overrides either.

    python examples/quickstart.py [--workdir runs/quickstart] [--sft-steps 150] [--rpo-steps 100]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(REPO, "configs", "tiny_cpu.yaml")
DATA = os.path.join(REPO, "data", "hh_harmless_slice.jsonl")
TRAIN_ROWS = 200  # the remaining 43 rows (3 of them unusable: their prompts differ) are held out


def say(message: str) -> None:
    print(f"\n== {message}", flush=True)


def train(nproc: int, *overrides: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "megatron_rpo.train", "--config", RECIPE, *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    subprocess.run(cmd, check=True, env=env, cwd=REPO)


def last_eval(tensorboard_dir: str) -> dict:
    """The last evaluation's metrics a run wrote to TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(tensorboard_dir)
    events.Reload()
    return {tag.split("/", 1)[1]: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"]
            if tag.startswith("eval/")}


def likelihood_eval(nproc: int, common: list[str], load: str) -> dict:
    """Held-out metrics of a checkpoint under the sft loss (train.train_iters=0: evaluation only)."""
    print(f"likelihood evaluation of {load}: the held-out pairs under the sft loss, no training", flush=True)
    out = os.path.join(os.path.dirname(load), "eval_likelihood")
    train(nproc, *common, f"train.load={load}", "loss.loss_type=sft", "train.train_iters=0",
          f"train.tensorboard_dir={out}")
    return last_eval(out)


def plot_run(run: str) -> str:
    """Loss, margin and accuracy of ``run`` against the step, ``<run>/run.png`` (or why there is none)."""
    from megatron_rpo.plot import plot_run as draw

    try:
        return draw(run)
    except ImportError as e:
        return f"none ({e})"


MARKER = ".megatron_rpo_quickstart"


def prepare_workdir(work: str, marker: str = MARKER, made_by: str = "the quickstart") -> None:
    """An empty work folder. A previous run's (it holds ``marker``) is replaced, and that is said; anything
    else is refused."""
    if os.path.isdir(work) and os.listdir(work):
        if not os.path.exists(os.path.join(work, marker)):
            raise SystemExit(f"{work} exists and was not made by {made_by}; choose another --workdir "
                             "or remove it yourself")
        print(f"replacing the previous run of {made_by} in {work} (its checkpoints too); --workdir elsewhere "
              "keeps it", flush=True)
        shutil.rmtree(work)
    os.makedirs(work, exist_ok=True)
    open(os.path.join(work, marker), "w").close()


def choose_nproc(requested: int | None) -> int:
    """2 gloo processes on CPU; on CUDA one per GPU (NCCL ranks cannot share a GPU), at most 2."""
    if torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        if requested is not None and requested > gpus:
            raise SystemExit(f"--nproc {requested} needs {requested} GPUs; this machine has {gpus}")
        nproc = requested or min(2, gpus)
        print(f"CUDA: {gpus} GPU(s) visible; training with {nproc} process(es), one per GPU", flush=True)
        return nproc
    return requested or 2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=os.path.join(REPO, "runs", "quickstart"))
    p.add_argument("--sft-steps", type=int, default=150)
    p.add_argument("--rpo-steps", type=int, default=100)
    p.add_argument("--rpo-lr", type=float, default=5e-5, help="RPO learning rate (the warm-up uses the recipe's)")
    p.add_argument("--nproc", type=int, default=None,
                   help="processes per training stage (default: 2 on CPU; one per GPU, at most 2, on CUDA)")
    args = p.parse_args()
    args.nproc = choose_nproc(args.nproc)
    started = time.time()
    work = os.path.abspath(args.workdir)
    prepare_workdir(work)

    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_rpo.config import load_config
    from megatron_rpo.convert import convert_hf_to_megatron, convert_megatron_to_hf
    from megatron_rpo.convert.hf_config import hf_config_from_model
    from megatron_rpo.data.embeddings import precompute_prompt_embeddings
    from megatron_rpo.data.preprocess import preprocess
    from megatron_rpo.data.tokenizer import load_tokenizer, train_sentencepiece

    model_config = load_config(RECIPE).model
    with open(DATA) as f:
        lines = f.readlines()
    say("tokenizer and a tiny random Llama (Hugging Face format)")
    texts = [json.loads(line)[key] for line in lines[:TRAIN_ROWS] for key in ("chosen", "rejected")]
    sp_model = train_sentencepiece(texts, os.path.join(work, "tokenizer"), vocab_size=model_config.vocab_size)
    hf_init = os.path.join(work, "hf_init")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**hf_config_from_model(model_config))).save_pretrained(hf_init)
    shutil.copy(sp_model, os.path.join(hf_init, "tokenizer.model"))

    say("HF -> Megatron conversion")
    ckpt = os.path.join(work, "megatron_init")
    convert_hf_to_megatron(hf_init, ckpt, progress=False)
    print(f"converted checkpoint: {ckpt}")

    say("preprocessing and prompt embeddings")
    prefixes, pair_counts = {}, {}
    for split, rows in (("train", lines[:TRAIN_ROWS]), ("valid", lines[TRAIN_ROWS:])):
        src = os.path.join(work, f"{split}.jsonl")
        with open(src, "w") as f:
            f.writelines(rows)
        prefix = os.path.join(work, "data", split)
        m = preprocess([src], "hh", sp_model, prefix, max_prompt_length=96, max_length=160, progress=False).manifest
        precompute_prompt_embeddings(prefix, progress=False)
        skipped = ", ".join(f"line {s['line']} ({s['field']}: {s['reason']})" for s in m["skipped"])
        print(f"{split}: {m['num_pairs']} pairs -> {prefix}.*{'; skipped ' + skipped if skipped else ''}")
        prefixes[split] = prefix
        pair_counts[split] = m["num_pairs"]
    common = [f"data.train_data_prefix={prefixes['train']}", f"data.valid_data_prefix={prefixes['valid']}"]

    say(f"supervised warm-up on the chosen responses ({args.sft_steps} steps)")
    sft = os.path.join(work, "sft")
    train(args.nproc, *common, f"train.load={ckpt}", "loss.loss_type=sft", f"train.train_iters={args.sft_steps}",
          f"train.save={sft}", f"train.log_interval={max(1, args.sft_steps // 10)}")
    before_rpo = likelihood_eval(args.nproc, common, os.path.join(sft, "export"))

    say(f"RPO from the warmed-up model ({args.rpo_steps} steps, online reference)")
    rpo = os.path.join(work, "rpo")
    train(args.nproc, *common, f"train.load={os.path.join(sft, 'export')}", f"train.train_iters={args.rpo_steps}",
          f"train.save={rpo}", f"train.log_interval={max(1, args.rpo_steps // 10)}",
          f"train.eval_interval={max(1, args.rpo_steps // 2)}", f"optimizer.lr={args.rpo_lr}")
    rpo_eval = last_eval(os.path.join(rpo, "tensorboard"))  # rewards against the warm-up model
    plot = plot_run(rpo)
    after_rpo = likelihood_eval(args.nproc, common, os.path.join(rpo, "export"))

    say("export to Hugging Face and one reply with transformers")
    hf_out = os.path.join(work, "hf_rpo")
    convert_megatron_to_hf(os.path.join(rpo, "export"), hf_out, progress=False)
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(sp_model)
    prompt = "\n\nHuman: How do I make a cup of tea?\n\nAssistant:"
    ids = torch.tensor([[tok.bos_id] + tok.encode(prompt)])
    model = AutoModelForCausalLM.from_pretrained(hf_out).eval()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=40, do_sample=False, eos_token_id=tok.eos_id, pad_token_id=tok.eos_id)
    print(f"prompt: {prompt!r}\nreply:  {tok.decode(out[0, ids.shape[1]:].tolist())!r}")

    say(f"summary ({time.time() - started:.0f} s)")
    pairs = pair_counts["valid"]
    print(f"{pairs} held-out pairs (one standard error of an accuracy near 0.5: +-{0.5 / max(pairs, 1) ** 0.5:.2f}); "
          "'likelihood accuracy': the model gives the chosen response a higher per-token log-prob than the "
          "rejected one (ties count half)")
    print(f"  likelihood accuracy after warm-up, before RPO: {before_rpo['rewards/accuracies']:.3f}")
    print(f"  likelihood accuracy after RPO:                 {after_rpo['rewards/accuracies']:.3f}")
    print("  RPO reward accuracy (beta * log-ratio against the warm-up model): "
          f"{rpo_eval['rewards/accuracies']:.3f}, "
          f"margin {rpo_eval['rewards/margins']:+.4f} (before RPO: 0.5 and 0, by construction)")
    print("artefacts:")
    for label, path in (("tokenizer", sp_model), ("initial HF model", hf_init), ("converted checkpoint", ckpt),
                        ("datasets", os.path.join(work, "data")), ("warm-up run", sft), ("RPO run", rpo),
                        ("RPO checkpoints", os.path.join(rpo, "latest")),
                        ("TensorBoard", os.path.join(rpo, "tensorboard")), ("Hugging Face export", hf_out),
                        ("run plot", plot)):
        print(f"  {label:<22} {path}")
    print(f"redraw the plot of any run: python -m megatron_rpo.plot {rpo}")


if __name__ == "__main__":
    main()
