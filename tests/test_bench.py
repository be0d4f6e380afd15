"""The benchmark's correctness guard and its report (tiny size: seconds on a CPU)."""

from __future__ import annotations

import json

import pytest
import torch

from vlm.convert import FORMATS
from vlm.eval import bench
from vlm.eval.bench_common import pick_device, race, step_flops, write_report
from vlm.eval.bench_options import TRAINING_VARIANTS, cache_rows, image_scaling_rows, training_rows


def test_the_benchmark_covers_every_registered_format():
    assert tuple(FORMATS) == bench.MODELS
    assert bench.MODELS[:3] == ("llava", "blip2", "idefics")
    assert {"llava_next", "llava_onevision", "idefics3", "smolvlm"} <= set(bench.MODELS)


@pytest.mark.parametrize("name", bench.MODELS)
def test_guard_passes_on_converted_weights_and_catches_a_difference(name, tmp_path):
    size = bench.SIZES["tiny"]
    hf_model, model, _ = bench.model_pair(name, size, tmp_path)
    inputs = bench.make_inputs(name, model, size, 2, answer=size.answer)
    guard = bench.check_parity(name, hf_model, model, inputs, atol=1e-4)
    assert guard["max_logit_diff"] <= 1e-4 and guard["loss_diff"] <= 1e-4
    with torch.no_grad():  # one connector weight off: the race must refuse to start
        weight = next(model.bridge.parameters())
        weight.add_(torch.randn_like(weight) * 0.5)
    with pytest.raises(AssertionError, match="disagree"):
        bench.check_parity(name, hf_model, model, inputs, atol=1e-4)


def test_connector_only_training_leaves_the_rest_frozen(tmp_path):
    size = bench.SIZES["tiny"]
    hf_model, model, _ = bench.model_pair("blip2", size, tmp_path)
    ours = bench.set_trainable("blip2", model, "connector", ours=True)
    theirs = bench.set_trainable("blip2", hf_model, "connector", ours=False)
    # The same tensors train on both sides (query tokens, Q-Former, projection), minus the
    # Q-Former's text-only path, which vlm does not carry.
    assert {id(p) for p in ours} == {id(p) for p in model.bridge.parameters()}
    assert hf_model.language_model.lm_head.weight.requires_grad is False
    assert all(p.requires_grad for p in hf_model.qformer.parameters())
    assert len(theirs) > len(ours) > 0


def test_run_writes_json_and_markdown_with_a_ratio_per_row(tmp_path):
    results, path = bench.run(["llava"], size="tiny", device="cpu", out=tmp_path, iters=3, loader_images=10)
    data = json.loads(path.read_text())
    tiny = bench.SIZES["tiny"]
    measures = [row["measure"] for row in data["rows"]]
    assert measures == [
        "train step, connector trainable",
        "train step, full trainable",
        "generate 8 tokens, batch 1",
        "generate 8 tokens, batch 1, static cache + compile",
        "generate 8 tokens, batch 16",
        "generate 8 tokens, batch 16, static cache + compile",
        f"cross-entropy, {tiny.train_batch * tiny.answer} tokens x {tiny.vocab} vocabulary, "
        "forward + backward",
        "shards to pixels 224 px, one worker",
        "shards to pixels 224 px, one worker, draft decoding",
        "shards to pixels 336 px, one worker",
        "shards to pixels 336 px, one worker, draft decoding",
    ]
    for row in data["rows"]:
        assert row["ratio"] == pytest.approx(row["vlm"] / row["transformers"])
        assert row["vlm"] > 0 and row["transformers"] > 0
        low, median, high = row["ratio_spread"]  # round by round: the noise beside the figure
        assert 0 < low <= median <= high
    assert data["guards"]["llava"]["max_logit_diff"] <= 1e-4
    assert {"torch", "transformers", "torchvision", "webdataset", "pillow"} <= set(data)
    assert data["feeding"]["pixels"] == bench.SIZES["large"].image
    assert set(data["feeding"]["workers"]) == {"with full decoding", "with draft decoding"}
    table = path.with_suffix(".md").read_text()
    assert "| llava | train step, full trainable |" in table and "min / median / max" in table
    assert "| loader | shards to pixels 336 px, one worker |" in table and "Loader workers for" in table
    before = [r["per_tensor_adamw"] for r in data["rows"] if "per_tensor_adamw" in r]
    assert len(before) == 2 and all(b["ratio"] == pytest.approx(b["vlm"] / b["transformers"]) for b in before)
    assert "vlm fused / vlm loop" in table


def test_both_sides_train_with_the_optimizer_transformers_trainer_builds():
    optimizer = bench.training_optimizer([torch.nn.Parameter(torch.zeros(3))])
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"] is True


def test_best_settings_ask_both_sides_for_a_static_cache_and_a_compiled_step():
    settings = bench.generation_settings(best=True)
    ours, theirs, warmup = settings[", static cache + compile"]
    assert ours == {"cache": "static", "compile": True}
    assert theirs["cache_implementation"] == "static" and theirs["compile_config"]._compile_all_devices
    assert warmup == 2 and list(bench.generation_settings(best=False)) == [""]


def test_spread_pairs_the_rounds():
    from vlm.eval.bench_common import spread

    assert spread([2.0, 3.0, 8.0], [1.0, 1.0, 2.0]) == [2.0, 3.0, 4.0]


def test_training_options_run_every_variant(shapes_dir):
    rows = training_rows(steps=2, shapes=str(shapes_dir), device="cpu")  # each a `vlm train` process
    assert [r["variant"] for r in rows] == list(TRAINING_VARIANTS)
    assert all(r["answer_tokens_per_s"] > 0 for r in rows)
    compared = [r for r in rows if TRAINING_VARIANTS[r["variant"]][1]]
    assert len(compared) == 4 and all(r["ratio"] > 0 for r in compared)


def test_generation_cost_is_measured_per_new_token_for_one_and_four_images():
    rows = image_scaling_rows(size="tiny", tokens=8, repeats=2, device="cpu")
    assert [r["model"] for r in rows] == ["llava", "idefics"]
    for r in rows:
        assert r["ratio"] == pytest.approx(r["ms_per_token_4_images"] / r["ms_per_token_1_image"])


def test_step_flops_counts_a_matmul_forward_and_backward():
    """2·m·k·n for the forward matmul, twice that for the two backward matmuls."""
    w = torch.randn(64, 32, requires_grad=True)
    x = torch.randn(16, 64, requires_grad=True)

    def step():
        (x @ w).sum().backward()

    assert step_flops(step) == 3 * 2 * 16 * 64 * 32


def test_cache_variants_are_compared_to_the_dynamic_cache():
    rows = cache_rows(size="tiny", rows=2, tokens=4, compile=False, device="cpu")
    assert [r["variant"] for r in rows] == ["dynamic cache", "static cache"]
    assert rows[0]["ratio"] == 1.0 and rows[1]["ratio"] > 0


def test_pick_device_reads_auto_as_cuda_when_present():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_race_gives_the_median_of_interleaved_rounds():
    order = []
    calls = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    seconds = race(calls, torch.device("cpu"), warmup=1, iters=3)
    assert order == ["a", "b"] * 4  # one warm-up round, then three timed ones
    assert set(seconds) == {"a", "b"} and all(s >= 0 for s in seconds.values())


def test_write_report_names_the_files_after_the_device(tmp_path):
    path = write_report({"device": "NVIDIA H200", "x": 1}, tmp_path, "bench", lambda r: f"# {r['x']}\n")
    assert path == tmp_path / "bench-nvidia-h200.json"
    assert json.loads(path.read_text()) == {"device": "NVIDIA H200", "x": 1}
    assert path.with_suffix(".md").read_text() == "# 1\n"
    assert (
        not write_report({"device": "cpu-x86_64-2threads"}, tmp_path, "convert").with_suffix(".md").exists()
    )


def test_profile_tables_name_each_side_and_its_operators(tmp_path):
    from vlm.eval import bench_profile

    path = bench_profile.run("idefics", size="tiny", device="cpu", out=tmp_path)
    text = path.read_text()
    for title in ("vlm, connector trainable", "transformers, full trainable"):
        assert f"## {title}" in text
    assert "aten::mm" in text and "Self CPU" in text
