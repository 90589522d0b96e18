"""Win rates of trained models, the way the paper measures them: ``python -m megatron_rpo.evaluate``.

Each model answers held-out prompts (greedy by default), a judge compares every answer with the
test set's chosen response (or two models head to head), and a table gives each model's win rate
(ties half) with its standard error. Everything asked is kept in --output: the same command
resumes a stopped run, and a second judge reuses the responses.

    # a local judge model and two exported runs, on HH's test split
    python -m megatron_rpo.evaluate --data test.jsonl.gz --format hh \\
        --model rpo=runs/rpo/export --model dpo=runs/dpo/export \\
        --judge local-llm --judge-path /models/judge --output runs/eval_hh
    # GPT-4 as the paper did (OPENAI_API_KEY), a 70B export served by vLLM
    python -m megatron_rpo.evaluate --data test.jsonl.gz --format hh --tokenizer /models/llama70b \\
        --endpoint-model rpo70b=http://node1:8000/v1@rpo70b \\
        --judge llm --judge-url https://api.openai.com/v1 --judge-model gpt-4-0613 --output runs/eval_70b
"""

from __future__ import annotations

import argparse
import os
import sys

from megatron_rpo.errors import INPUT_ERROR_EXIT_CODE, InputError, report

__all__ = ["main"]


def _named(values: list[str], flag: str) -> dict[str, str]:
    out = {}
    for value in values:
        name, sep, rest = value.partition("=")
        if not sep or not name or not rest:
            raise InputError(f"{flag} takes NAME=WHAT, got {value!r}")
        if name in out or name == "reference":
            raise InputError(f"{flag} {value!r}: the name {name!r} is " +
                             ("taken" if name in out else "the held-out chosen response's"))
        out[name] = rest
    return out


def _local_model(name: str, path: str, output: str, progress: bool) -> str:
    """A Hugging Face folder for ``path``: itself, or the export of a converted checkpoint (made once)."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    from megatron_rpo.convert.files import MARKER

    if not os.path.isfile(os.path.join(path, MARKER)):
        raise InputError(f"--model {name}={path}: neither a Hugging Face folder (config.json) nor a converted "
                         f"checkpoint ({MARKER}); a run's export/ folder is the latter")
    exported = os.path.join(output, "exports", name)
    if not os.path.isfile(os.path.join(exported, "config.json")):
        from megatron_rpo.convert import convert_megatron_to_hf

        print(f"exporting {path} to {exported}", file=sys.stderr, flush=True)
        convert_megatron_to_hf(path, exported, progress=progress)
    return exported


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megatron_rpo.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("prompts")
    data.add_argument("--data", nargs="+", required=True,
                      help="held-out rows: .jsonl/.jsonl.gz/.parquet files, datasets folders or hub names")
    data.add_argument("--format", choices=("hh", "pairs", "unpaired", "tldr"), default=None,
                      help="as the preprocessing tool's (default: detected from the columns)")
    data.add_argument("--split", default=None, help="split of dataset folders and hub datasets")
    data.add_argument("--samples", type=int, default=256,
                      help="prompts evaluated, the same draw for a seed (default 256, the paper's; 0: all)")
    data.add_argument("--seed", type=int, default=0, help="the draw of prompts, the judge's seed (default 0)")
    data.add_argument("--max-prompt-length", type=int, default=256, help="prompt tokens kept, from the end (256)")
    data.add_argument("--max-length", type=int, default=512, help="prompt + response tokens at most (512)")
    data.add_argument("--tokenizer", default=None,
                      help="the models' tokenizer (default: the first --model's folder); needed with endpoints only")
    data.add_argument("--chat-template", default=None, help="a Jinja chat template file, as for preprocessing")
    models = p.add_argument_group("models")
    models.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                        help="an exported Hugging Face folder or a converted checkpoint (exported once, into "
                             "OUTPUT/exports/NAME); repeat for several")
    models.add_argument("--endpoint-model", action="append", default=[], metavar="NAME=URL@MODEL",
                        help="a model served by an OpenAI-compatible endpoint, e.g. rpo=http://node1:8000/v1@rpo")
    models.add_argument("--api-key-env", default="OPENAI_API_KEY",
                        help="the variable holding the models' endpoint key (default OPENAI_API_KEY)")
    models.add_argument("--max-new-tokens", type=int, default=256, help="response tokens at most (256)")
    models.add_argument("--temperature", type=float, default=0.0, help="0: greedy, the paper's (default)")
    models.add_argument("--top-p", type=float, default=1.0)
    models.add_argument("--batch-size", type=int, default=8, help="prompts per generate call of a local model")
    models.add_argument("--head-to-head", action="store_true",
                        help="the first model against the second, not against the held-out chosen responses")
    judge = p.add_argument_group("judge")
    judge.add_argument("--judge", choices=("llm", "local-llm", "reward-model"), required=True,
                       help="llm: a chat model behind an OpenAI-compatible endpoint (GPT-4, vLLM); local-llm: a "
                            "causal LM folder through transformers; reward-model: a sequence-classification folder")
    judge.add_argument("--judge-url", default=None, help="llm: the endpoint, e.g. https://api.openai.com/v1")
    judge.add_argument("--judge-model", default=None, help="llm: the model name, e.g. gpt-4-0613 (the paper's)")
    judge.add_argument("--judge-api-key-env", default="OPENAI_API_KEY",
                       help="llm: the variable holding the judge's key (default OPENAI_API_KEY)")
    judge.add_argument("--judge-path", default=None, help="local-llm, reward-model: the model folder")
    judge.add_argument("--judge-prompt", default=None,
                       help="dialogue or summarization (the paper's; default: summarization for tldr data, "
                            "dialogue otherwise) or a file with {history}, {response_1}, {response_2}")
    judge.add_argument("--protocol", choices=("both-orders", "single"), default="both-orders",
                       help="both-orders: each pair asked both ways, a split verdict a tie (default); single: the "
                            "paper's, one order per item drawn from the seed")
    judge.add_argument("--judge-max-tokens", type=int, default=10, help="the judge's answer length (10, the paper's)")
    robust = p.add_argument_group("endpoints")
    robust.add_argument("--concurrency", type=int, default=8, help="calls in flight per endpoint (8)")
    robust.add_argument("--timeout", type=float, default=120.0, help="seconds per call (120)")
    robust.add_argument("--retries", type=int, default=8,
                        help="retries per call on 429, 5xx, dropped connections and malformed answers (8)")
    out = p.add_argument_group("output")
    out.add_argument("--output", default="runs/evaluate", help="results, responses and verdicts (runs/evaluate)")
    out.add_argument("--alpaca-eval-prompts", default=None,
                     help="AlpacaEval's prompt file (a JSON list of {instruction, ...}): also answer these")
    out.add_argument("--alpaca-eval-outputs", default=None,
                     help="where to write the answers in alpaca_eval's model_outputs.json format (one --model)")
    out.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _judge(args, template_default: str):
    from megatron_rpo.evaluate.endpoint import Endpoint
    from megatron_rpo.evaluate.judges import LLMJudge, LocalChat, RewardModelJudge, load_template

    if args.judge == "reward-model":
        if not args.judge_path:
            raise InputError("--judge reward-model needs --judge-path (the reward model's folder)")
        return RewardModelJudge(args.judge_path), 1, None
    template = load_template(args.judge_prompt or template_default)
    if args.judge == "local-llm":
        if not args.judge_path:
            raise InputError("--judge local-llm needs --judge-path (a causal LM folder)")
        backend, concurrency = LocalChat(args.judge_path), 1
    else:
        if not (args.judge_url and args.judge_model):
            raise InputError("--judge llm needs --judge-url and --judge-model (e.g. https://api.openai.com/v1 and "
                             "gpt-4-0613)")
        backend = Endpoint(args.judge_url, args.judge_model, api_key=os.environ.get(args.judge_api_key_env),
                           timeout=args.timeout, retries=args.retries)
        backend.check()
        concurrency = args.concurrency
    return (LLMJudge(backend, template, protocol=args.protocol, seed=args.seed, max_tokens=args.judge_max_tokens),
            concurrency, backend)


def run(args) -> int:
    from megatron_rpo.data.tokenizer import load_tokenizer
    from megatron_rpo.evaluate.endpoint import Endpoint
    from megatron_rpo.evaluate.generation import EndpointGenerator, HFGenerator
    from megatron_rpo.evaluate.items import load_items
    from megatron_rpo.evaluate.run import evaluate, markdown_table

    progress = not args.no_progress
    local = _named(args.model, "--model")
    served = _named(args.endpoint_model, "--endpoint-model")
    clash = set(local) & set(served)
    if clash:
        raise InputError(f"the model name {sorted(clash)[0]!r} is given twice")
    if not local and not served:
        raise InputError("name at least one model: --model NAME=PATH or --endpoint-model NAME=URL@MODEL")
    if args.head_to_head and len(local) + len(served) != 2:
        raise InputError(f"--head-to-head compares two models; {len(local) + len(served)} are named")
    if args.alpaca_eval_outputs and (len(local) + len(served) != 1 or not args.alpaca_eval_prompts):
        raise InputError("--alpaca-eval-outputs writes one model's answers: name one model and "
                         "--alpaca-eval-prompts")
    if args.alpaca_eval_prompts:
        from megatron_rpo.evaluate.alpaca import read_instructions

        read_instructions(args.alpaca_eval_prompts)  # a bad prompt file is said before any work
    folders = {name: _local_model(name, path, args.output, progress) for name, path in local.items()}
    tokenizer_path = args.tokenizer or (next(iter(folders.values())) if folders else None)
    if tokenizer_path is None:
        raise InputError("--tokenizer is needed when every model is behind an endpoint (the models' tokenizer: "
                         "prompts are rendered and cut as training did)")
    sp = os.path.join(tokenizer_path, "tokenizer.model")
    tokenizer = load_tokenizer(sp if os.path.isdir(tokenizer_path) and os.path.isfile(sp) else tokenizer_path)
    items, bad = load_items(args.data, args.format, tokenizer, samples=args.samples or None, seed=args.seed,
                            max_prompt_length=args.max_prompt_length, max_length=args.max_length, split=args.split,
                            chat_template=args.chat_template)
    print(f"{len(items)} held-out prompts from {', '.join(args.data)}" +
          (f" ({len(bad)} rows skipped, e.g. {bad[0]})" if bad else ""), file=sys.stderr, flush=True)
    if args.format is None:
        from megatron_rpo.data.formats import detect_format
        from megatron_rpo.data.sources import open_source

        args.format = detect_format(open_source(args.data[0], args.split).columns)
    # The judge before the models: a wrong judge endpoint is said before any model is loaded.
    judge, concurrency, judge_endpoint = _judge(args, "summarization" if args.format == "tldr" else "dialogue")
    options = dict(max_new_tokens=args.max_new_tokens, max_length=args.max_length, temperature=args.temperature,
                   top_p=args.top_p, seed=args.seed)
    generators = {}
    endpoints = []
    for name, folder in folders.items():
        generators[name] = HFGenerator(folder, batch_size=args.batch_size, tokenizer=tokenizer, **options)
    for name, spec in served.items():
        url, sep, model = spec.rpartition("@")
        if not sep or not url or not model:
            raise InputError(f"--endpoint-model {name}={spec}: expected URL@MODEL, e.g. http://node1:8000/v1@rpo")
        endpoint = Endpoint(url, model, api_key=os.environ.get(args.api_key_env), timeout=args.timeout,
                            retries=args.retries)
        endpoint.check()
        endpoints.append(endpoint)
        generators[name] = EndpointGenerator(endpoint, concurrency=args.concurrency, **options)
    settings = dict(vars(args))
    rows = evaluate(items, generators, judge, args.output, head_to_head=args.head_to_head,
                    length=lambda text: len(tokenizer.encode(text)), judge_concurrency=concurrency,
                    progress=progress, settings=settings)
    print(markdown_table(rows, judge.name, len(items)))
    for endpoint in endpoints + ([judge_endpoint] if judge_endpoint is not None else []):
        print(f"{endpoint!r}: {endpoint.calls} calls, {endpoint.retries} retried", file=sys.stderr)
    print(f"written: {os.path.join(args.output, 'results.md')}, results.json, judgements.jsonl (every item), "
          "generations.jsonl", file=sys.stderr)
    if args.alpaca_eval_outputs:
        from megatron_rpo.evaluate.alpaca import write_alpaca_eval_outputs

        name = next(iter(generators))
        count = write_alpaca_eval_outputs(args.alpaca_eval_prompts, args.alpaca_eval_outputs, name, generators[name],
                                          tokenizer, os.path.join(args.output, "generations.jsonl"),
                                          max_prompt_length=args.max_prompt_length, progress=progress)
        print(f"written: {args.alpaca_eval_outputs} ({count} AlpacaEval answers of {name}); run "
              f"alpaca_eval --model_outputs {args.alpaca_eval_outputs}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except InputError as e:
        report(e)
        return INPUT_ERROR_EXIT_CODE
    except KeyboardInterrupt:
        print(f"\nstopped: what was finished is kept in {args.output}; the same command continues from there",
              file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a call that failed after every retry: say how to go on
        from megatron_rpo.evaluate.endpoint import GaveUp

        if not isinstance(e, GaveUp):
            raise
        print(f"error: an endpoint call failed after every retry ({e}); what was finished is kept in "
              f"{args.output}: run the same command again to continue", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

