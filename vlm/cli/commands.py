"""What ``vlm demo | save | export`` run (their parsers are in ``vlm.cli``)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import transformers

from vlm.convert import check_export, export_transformers
from vlm.data.shapes import FOLLOW_UPS, combination
from vlm.eval.conversation import conversation_accuracy
from vlm.eval.evaluate import evaluate
from vlm.eval.fewshot import fewshot_accuracy
from vlm.eval.gallery import write_gallery
from vlm.eval.predict import Predictor
from vlm.generate import GenerationConfig
from vlm.hub import from_pretrained
from vlm.schema import ConfigError
from vlm.train.recipe import RECIPES, load_recipe
from vlm.train.trainer import train
from vlm.weights import load_tokenizer, save_pretrained


def demo_command(args: argparse.Namespace) -> int:
    """Shapes data -> the shapes recipe -> evaluation on the held-out test splits: captions and
    VQA, multi-turn conversations, and few-shot documents at 0, 1, 2 and 4 shots."""
    out = Path(args.out)
    recipe_path = args.recipe or RECIPES / "shapes.toml"
    recipe = load_recipe(recipe_path, [f"run.out={json.dumps(str(out / 'train'))}", *args.set])
    print(f"vlm demo: shapes data in {recipe.data.shapes}, recipe {recipe_path}, run in {out}")
    summary = train(recipe)

    data = Path(recipe.data.shapes)
    predictor = Predictor(summary["model"])
    start = time.perf_counter()
    test = str(data / "test")
    vqa_run = evaluate(
        summary["model"], test, "vqa", out / "eval-vqa", group=combination, predictor=predictor
    )
    caption_run = evaluate(
        summary["model"], test, "caption", out / "eval-caption", group=combination, predictor=predictor
    )
    follow_ups = set(FOLLOW_UPS.values())  # the turns about "it": they depend on the turn before
    conversations = str(data / "conversations" / "test")
    chat, chat_records = conversation_accuracy(predictor, conversations, depends=lambda q: q in follow_ups)
    own, _ = conversation_accuracy(predictor, conversations, depends=lambda q: q in follow_ups, history="own")
    fewshot, fewshot_records = fewshot_accuracy(predictor, str(data / "documents" / "test"))
    for name, records in (("eval-chat", chat_records), ("eval-fewshot", fewshot_records)):
        (out / name).mkdir(parents=True, exist_ok=True)
        lines = [json.dumps({k: v for k, v in r.items() if k not in ("image", "images")}) for r in records]
        (out / name / "predictions.jsonl").write_text("\n".join(lines) + "\n")
    vqa, caption = vqa_run.metrics, caption_run.metrics
    metrics = {
        "vqa_accuracy": vqa["vqa_accuracy"],
        **{
            k: caption[k]
            for k in ("cider", "bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "meteor")
            if k in caption
        },
        "conversation_accuracy": chat["conversation_accuracy"],
        "conversation_turn_accuracy": chat["turn_accuracy"],
        "conversation_accuracy_own_replies": own["conversation_accuracy"],
        "fewshot_accuracy": fewshot["fewshot_accuracy"],
        "train_seconds": round(summary["train_seconds"], 1),
        "eval_seconds": round(time.perf_counter() - start, 1),
        "train_steps": summary["steps"],
        "groups": {
            name: {
                "vqa_accuracy": vqa["groups"][name]["vqa_accuracy"],
                "cider": caption["groups"][name]["cider"],
            }
            for name in vqa.get("groups", {})
        },
    }
    try:
        metrics["export"] = export_demo_model(summary["model"], out / "hf", vqa_run.gallery)
    except ConfigError as err:  # another recipe's model may have no transformers counterpart
        metrics["export"] = {"not_exported": str(err)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    shown = caption_run.gallery[:24] + vqa_run.gallery[:36] + _gallery_items(chat_records, fewshot_records)
    headline = {k: v for k, v in metrics.items() if isinstance(v, float)}
    headline |= {f"fewshot_{k}": v for k, v in metrics["fewshot_accuracy"].items()}
    write_gallery(out / "gallery.html", "vlm demo: shapes test splits", shown, headline)
    print("\n  metric (test split)      all     " + "  ".join(f"{g:>22}" for g in metrics["groups"]))
    for key in ("vqa_accuracy", "cider"):
        groups = "  ".join(f"{metrics['groups'][g][key]:>22.3f}" for g in metrics["groups"])
        print(f"  {key:<22} {metrics[key]:>6.3f}   {groups}")
    for key in (
        "bleu4",
        "rouge_l",
        "conversation_accuracy",
        "conversation_accuracy_own_replies",
        "train_seconds",
    ):
        print(
            f"  {key:<22} {metrics[key]:>6.3f}"
            if isinstance(metrics[key], float)
            else f"  {key:<22} {metrics[key]}"
        )
    shots = "  ".join(f"{k}-shot {v:.3f}" for k, v in metrics["fewshot_accuracy"].items())
    print(f"  {'fewshot_accuracy':<22} {shots}")
    print("\n  a few predictions:")
    for item in shown[:3] + shown[24 + 33 : 24 + 36]:
        question = f"Q: {item['question']}  " if item.get("question") else ""
        expected = (item.get("answers") or item.get("references"))[0]
        print(f"    {question}-> {item['prediction']!r}   (expected {expected!r})")
    exported = metrics["export"]
    if "not_exported" in exported:
        print(f"\n  not exported to transformers: {exported['not_exported']}")
    else:
        print(
            f"\n  exported to {out / 'hf'} as {exported['architecture']}: logits "
            f"{exported['max_logit_difference']:.1e} from vlm's at most; transformers' pipeline gives "
            f"vlm's answer to {exported['same_answers']} of {exported['questions']} test questions"
        )
    print(f"\nwrote {out / 'metrics.json'} and {out / 'gallery.html'}")
    return 0 if exported.get("max_logit_difference", 0.0) <= CHECK_TOLERANCE else 1


def export_demo_model(model_dir: str, out: Path, asked: list[dict[str, Any]]) -> dict[str, Any]:
    """Exports the demo's model to transformers (:func:`export_transformers`), compares the
    export's logits with vlm's (:func:`check_export`), and asks the questions of ``asked``
    (records with ``image``, ``question`` and vlm's ``prediction``) through transformers' own
    ``image-text-to-text`` pipeline on the export, greedy."""
    model = from_pretrained(model_dir)
    fmt, out = export_transformers(model, load_tokenizer(model_dir), out)
    difference = check_export(model, fmt, out)
    pipe = transformers.pipeline("image-text-to-text", model=str(out))
    greedy = {"max_new_tokens": GenerationConfig.max_new_tokens, "do_sample": False}  # as vlm answered
    same = 0
    for record in asked:
        content = [{"type": "image", "image": record["image"]}, {"type": "text", "text": record["question"]}]
        message = {"role": "user", "content": content}
        reply = pipe(text=[message], generate_kwargs=greedy, return_full_text=False)
        same += reply[0]["generated_text"].strip() == record["prediction"]
    return {
        "architecture": fmt.architectures[0],
        "max_logit_difference": difference,
        "questions": len(asked),
        "same_answers": same,
    }


def _gallery_items(chat_records: list[dict], fewshot_records: list[dict]) -> list[dict]:
    """Later conversation turns and few-shot queries for the gallery: the first few, then every
    mistake (up to a limit), so that "mistakes only" shows them."""
    chat = [r for r in chat_records if r["depends"]]
    fewshot = [{**r, "question": f"{r['shots']}-shot: {r['prompt']}"} for r in fewshot_records]
    items = chat[:12] + [r for r in chat[12:] if not r["correct"]][:24]
    for k in sorted({r["shots"] for r in fewshot}):
        at_k = [r for r in fewshot if r["shots"] == k]
        items += at_k[:6] + [r for r in at_k[6:] if not r["correct"]][:12]
    return items


def save_command(args: argparse.Namespace) -> int:
    """Loads a model (a vlm directory, or a transformers LLaVA / BLIP-2 / IDEFICS one, converted)
    and writes it in vlm's format, with the tokenizer when the source has one."""
    source = Path(args.model)
    model = from_pretrained(source, dtype=args.dtype)
    tokenizer = load_tokenizer(source) if (source / "tokenizer_config.json").is_file() else None
    save_pretrained(model, args.out, tokenizer=tokenizer)
    print(f"wrote {args.out} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters)")
    return 0


#: The largest logit difference ``vlm export --check`` accepts, in float32 (the tests see < 1e-5).
CHECK_TOLERANCE = 1e-3


def export_command(args: argparse.Namespace) -> int:
    """Writes a vlm model as a transformers checkpoint (config, safetensors, tokenizer, processor)."""
    source = Path(args.model)
    model = from_pretrained(source)
    fmt, out = export_transformers(model, load_tokenizer(source), args.out, to=args.format)
    print(f"wrote {out}: {fmt.architectures[0]}, loads with transformers' AutoModelForImageTextToText")
    if not args.check:
        return 0
    difference = check_export(model, fmt, out)
    ok = difference <= CHECK_TOLERANCE
    print(
        f"check: transformers' logits are {difference:.2e} from vlm's at most on a probe batch (float32): "
        + ("ok" if ok else f"over {CHECK_TOLERANCE:g}, the export is wrong; please report it")
    )
    return 0 if ok else 1
