"""``vlm caption | vqa | eval | chat | serve | bench``: the parsers (``vlm.eval.commands`` runs
them)."""

from __future__ import annotations

import argparse

from vlm.subcommand import add_subcommand

#: ``vlm bench --size``: the sizes of ``vlm.eval.bench.SIZES`` (a test holds the two equal).
BENCH_SIZES = ("tiny", "small", "large")


def add_commands(commands: argparse._SubParsersAction) -> None:
    for task, help_text in (("caption", "caption images"), ("vqa", "answer a question about images")):
        sub = add_subcommand(
            commands,
            task,
            handler="vlm.eval.commands:predict_command",
            help=f"{help_text} (files, folders or shards) with a trained model",
        )
        sub.add_argument("images", nargs="+", help="image files, folders of images, or webdataset shards")
        sub.add_argument(
            "--model", required=True, help="a model directory (from `vlm train` or save_pretrained)"
        )
        if task == "vqa":
            sub.add_argument("--question", required=True, help="the question to ask about every image")
        sub.add_argument(
            "--support",
            help="few-shot: JSONL of {image, answer"
            + (", question" if task == "vqa" else "")
            + "} examples placed before every query (images relative to the file)",
        )
        sub.add_argument(
            "--shots",
            type=_count,
            default=None,
            help="with --support: use its first K examples (default: all of them)",
        )
        sub.add_argument("--out", default=None, help="JSONL file to write (default: print to stdout)")
        sub.add_argument("--batch-size", type=int, default=16, help="images per forward pass")
        sub.add_argument("--max-new-tokens", type=int, default=32, help="the longest answer, in tokens")
        sub.add_argument("--num-beams", type=int, default=1, help="beam search when above 1 (1: greedy)")
        sub.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")

    ev = add_subcommand(
        commands,
        "eval",
        handler="vlm.eval.commands:eval_command",
        help="evaluate a model on shards, or score a predictions file",
    )
    ev.add_argument("--task", required=True, choices=["caption", "vqa"], help="what the model is scored on")
    ev.add_argument("--out", required=True, help="directory for metrics.json (and gallery.html)")
    ev.add_argument("--model", help="a model directory")
    ev.add_argument("--data", help="shards to evaluate on")
    ev.add_argument("--predictions", help="JSONL of {prediction, references | answers} from any model")
    ev.add_argument("--limit", type=int, default=None, help="evaluate at most this many examples")
    ev.add_argument(
        "--shots",
        type=_int_list,
        default=None,
        help="few-shot: numbers of support examples, e.g. 0,1,2,4 (a report for each)",
    )
    ev.add_argument("--support", help="shards the support examples are drawn from (another split)")
    ev.add_argument("--seed", type=int, default=0, help="seed of the support draws")
    ev.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")

    chat = add_subcommand(
        commands,
        "chat",
        handler="vlm.eval.commands:chat_command",
        help="talk with a trained model about images, in the terminal",
    )
    chat.add_argument("images", nargs="*", help="images that go with your first message")
    chat.add_argument(
        "--model", required=True, help="a model directory (from `vlm train` or save_pretrained)"
    )
    chat.add_argument("--max-new-tokens", type=int, default=128, help="the longest reply, in tokens")
    chat.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")

    serve = add_subcommand(
        commands,
        "serve",
        handler="vlm.eval.commands:serve_command",
        help="serve a model over OpenAI's chat-completions API, with a page at /",
    )
    serve.add_argument(
        "--model", required=True, help="a model directory (from `vlm train` or save_pretrained)"
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on")
    serve.add_argument(
        "--served-model-name", help="the model id clients ask for (default: the directory's name)"
    )
    serve.add_argument(
        "--max-batch-size", type=int, default=16, help="requests generating at once (1: one at a time)"
    )
    serve.add_argument("--max-tokens", type=int, default=128, help="a completion's budget when none is asked")
    serve.add_argument("--max-images", type=int, default=8, help="images per request, at most")
    serve.add_argument("--max-body-mb", type=float, default=20.0, help="request bodies over this are refused")
    serve.add_argument(
        "--local-images", metavar="DIR", help="allow file:// URLs and paths to images inside DIR"
    )
    serve.add_argument("--allow-remote-images", action="store_true", help="fetch http(s):// image URLs")
    serve.add_argument(
        "--allow-private-image-hosts",
        action="store_true",
        help="let remote image URLs reach loopback, private, link-local and reserved addresses "
        "(refused by default: they are the server's own network)",
    )
    serve.add_argument(
        "--remote-image-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds a whole remote image fetch may take, redirects included (default: 10)",
    )
    serve.add_argument(
        "--max-waiting",
        type=int,
        default=64,
        metavar="N",
        help="requests waiting beyond the running batch; past it: 503 with Retry-After (default: 64)",
    )
    serve.add_argument(
        "--request-timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="a request not finished S seconds after it was admitted gets 503 (default: 600; 0: none)",
    )
    serve.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")

    parser = add_subcommand(
        commands,
        "bench",
        handler="vlm.eval.commands:bench_command",
        help="time vlm against transformers' LLaVA, BLIP-2 and IDEFICS",
    )
    parser.add_argument(
        "--models",
        nargs="+",
        metavar="MODEL",
        help="the checkpoint formats to time (default: every one vlm converts)",
    )
    parser.add_argument(
        "--size", default="small", choices=BENCH_SIZES, help="tiny: the tests'; small: CPU; large: GPU"
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    parser.add_argument("--iters", type=int, default=6, help="timed rounds per measurement")
    parser.add_argument(
        "--out",
        default="runs/bench",
        help="where bench-<device>.json/.md go (--out eval/results updates the repository's)",
    )
    parser.add_argument(
        "--defaults-only",
        action="store_true",
        help="leave out the generation rows at both libraries' fastest settings (they compile)",
    )
    parser.add_argument(
        "--loader-images",
        type=int,
        default=400,
        help="images in the loader rows' shards (0 leaves the loader rows out)",
    )
    parser.add_argument(
        "--profile",
        metavar="MODEL",
        help="instead: torch.profiler's top operators of this model's training steps (profile-<model>-*.md)",
    )
    parser.add_argument(
        "--options",
        action="store_true",
        help="instead: what packing, the feature cache and the KV cache buy (options-<device>.*)",
    )
    parser.add_argument(
        "--serve",
        action="store_true",
        help="instead: vlm serve with 1, 4 and 16 clients, batched and not (serve-<device>.*)",
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="--serve: seconds of load per run")
    parser.add_argument(
        "--convert",
        action="store_true",
        help="instead: peak memory of converting a bf16 LLaVA checkpoint (convert-<device>.json)",
    )


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number of examples (0 or more), got {text!r}")
    return value


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected numbers like 0,1,2,4, got {text!r}") from err
