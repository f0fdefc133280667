"""The vision recipe on a tiny Qwen2.5-VL built from the real processor config, tokenizer and
chat template (../shared/models/qwen2.5-vl-instruct), with real PNGs and real videos written
with PyAV: labels on the answer only, token by token; video patches in the layout of the model's
own image processor; rows counted on the login node exactly as they are encoded; a row too long
refused before anything is created; and a run of image, video and text-only rows trained end to
end, its adapter on the language model only, merged into a folder that loads without peft."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, read_jsonl, write_jsonl
from test_media import write_video
from slurmtune.data.vision import VisionSettings, load_encoder
from slurmtune.train.tiny_model import make_tiny_vlm

QWEN_VL = REPO.parent / "shared" / "models" / "qwen2.5-vl-instruct"
SETTINGS = VisionSettings(fps=2.0, max_frames=4, max_pixels=56 * 56)


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("vision")
    Image.new("RGB", (100, 60), (200, 10, 10)).save(root / "page.png")
    return {"root": root, "model": make_tiny_vlm(root / "tiny-vl", QWEN_VL),
            "image": root / "page.png", "video": write_video(root / "talk.mp4")}


@pytest.fixture
def encoder(media, tmp_path):
    return load_encoder(media["model"], SETTINGS, tmp_path / "frames")


def row(media, answer: str = '{"score": 4}') -> dict:
    return {"messages": [
        {"role": "system", "content": "You grade speeches."},
        {"role": "user", "content": [{"type": "text", "text": "Score the talk; the slide is attached."},
                                     {"type": "image", "image": str(media["image"])},
                                     {"type": "video", "video": str(media["video"])}]},
        {"role": "assistant", "content": answer}]}


def test_only_the_answer_carries_loss_token_by_token(encoder, media):
    encoded = encoder.encode(row(media))
    ids, labels, tok = encoded["input_ids"], encoded["labels"], encoder.tokenizer
    trained = [i for i, label in enumerate(labels) if label != -100]
    assert [labels[i] for i in trained] == [ids[i] for i in trained]
    assert tok.decode([ids[i] for i in trained]) == '{"score": 4}<|im_end|>'
    assert trained == list(range(trained[0], trained[-1] + 1)) and trained[-1] == len(ids) - 2  # then "\n"
    image, video = encoded["media"]
    assert (image["grid"], image["tokens"]) == ((1, 2, 4), 2)  # 100x60 within 56x56 pixels: 28x56
    assert (video["grid"], video["tokens"]) == ((2, 4, 4), 8)  # 4 frames of 56x56: 2 temporal patches
    assert video["second_per_grid"] == pytest.approx(1.5)  # 4 frames over 3 s: 2 frames per 1.5 s
    pads = {t: sum(i == tok.convert_tokens_to_ids(t) for i in ids) for t in ("<|image_pad|>", "<|video_pad|>")}
    assert pads == {"<|image_pad|>": 2, "<|video_pad|>": 8}
    assert all(labels[i] == -100 for i, t in enumerate(ids) if t in [tok.convert_tokens_to_ids(p) for p in pads])
    system = tok.decode(ids[:trained[0]])
    assert system.startswith("<|im_start|>system\nYou grade speeches.<|im_end|>\n<|im_start|>user\n")
    assert system.endswith("<|im_start|>assistant\n")


def test_video_patches_are_laid_out_as_the_image_processor_lays_out_an_image(encoder, media):
    """Two identical frames are one temporal patch of that image (the image processor repeats an
    image to fill its temporal patch): the same numbers in the same order."""
    frame = np.asarray(Image.open(media["image"]).convert("RGB").resize((56, 28)))
    video, grid = encoder.video_patches(np.stack([frame, frame]))
    image = encoder.images(images=[Image.fromarray(frame)], size={"shortest_edge": 28 * 28, "longest_edge": 56 * 56},
                           return_tensors="np")
    assert grid == tuple(image["image_grid_thw"][0]) == (1, 2, 4)
    assert video.shape == image["pixel_values"].shape == (8, 1176)
    np.testing.assert_allclose(video, image["pixel_values"], rtol=1e-5, atol=1e-5)
    odd, grid = encoder.video_patches(np.stack([frame, frame, frame]))  # the last frame fills the pair
    assert grid == (2, 2, 4) and np.array_equal(odd[8:], odd[:8])


def test_the_login_node_count_is_what_training_encodes(encoder, media):
    record = row(media)
    counted = encoder.count(record)
    assert not encoder.cache.root.exists()  # counting decodes nothing and writes nothing
    encoded = encoder.encode(record)
    assert counted == (len(encoded["input_ids"]), 10, sum(label != -100 for label in encoded["labels"]))
    assert len(list(encoder.cache.root.glob("*.npy"))) == 1


def question(media, kind: str, expected: str) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "text", "text": "What does it show?"},
                                                       {"type": kind, kind: str(media[kind])}]}],
            "expected": expected}


def test_batched_answers_equal_one_at_a_time(encoder, media):
    """Left padding must not move an image's tokens in time or space (Qwen's 3-D positions)."""
    from transformers import AutoModelForImageTextToText

    from slurmtune.evaluate.generate import predict_vision

    model = AutoModelForImageTextToText.from_pretrained(media["model"]).eval()
    torch.manual_seed(0)  # an untied random head: the tied one only repeats the last token ("\n")
    model.lm_head = torch.nn.Linear(64, model.lm_head.out_features, bias=False)
    records = [question(media, "image", "a"), question(media, "video", "b"),
               {"messages": [{"role": "user", "content": "A text-only question, longer than the others are."}]}]
    alone = [predict_vision(model, encoder, [r], 1, 6)[0] for r in records]
    assert predict_vision(model, encoder, records, 3, 6) == alone
    assert len(set(alone)) == 3 and all(alone)  # three different, non-empty answers


def manifest(tmp_path: Path, media: dict, rows: list[dict], eval_rows: list[dict] = (), **train) -> Path:
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    evals = {"eval_file": str(write_jsonl(tmp_path / "eval.jsonl", eval_rows))} if eval_rows else {}
    settings = {"method": "lora", "max_steps": 3, "batch_size": 2, "grad_accum": 1, "max_length": 256,
                "save_steps": 2, **train}
    path = tmp_path / "vl.yaml"
    path.write_text(json.dumps({
        "name": "vl", "output_dir": str(tmp_path / "runs"), "model": {"path": str(media["model"])},
        "data": {"train_files": [str(data)], **evals}, "eval": {"max_new_tokens": 8, "batch_size": 2}, "lora": {"r": 4, "target_modules": ["q_proj", "v_proj", "gate_proj"]},
        "train": settings, "vision": {"fps": 2.0, "max_frames": 4, "max_pixels": 3136}, "slurm": {"gpus": 0}}))
    return path


def test_a_row_too_long_is_refused_on_the_login_node_with_its_numbers(cli, media, tmp_path):
    rows = [row(media), {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    r = cli("run", manifest(tmp_path, media, rows, max_length=40), "--executor", "debug")
    assert r.code == 1
    line = next(x for x in r.err.splitlines() if "train.jsonl:1" in x).strip()
    assert line.startswith(f"{tmp_path / 'train.jsonl'}:1: ")
    assert "tokens (10 of them images/video) over train.max_length 40" in line
    assert "vision.max_pixels, now 3136" in line and "vision.max_frames, now 4" in line
    assert not (tmp_path / "runs").exists()


def test_bad_media_is_refused_on_the_login_node(cli, media, tmp_path):
    (tmp_path / "empty.mp4").write_bytes(b"")
    bad = row(media)
    bad["messages"][1]["content"][2]["video"] = str(tmp_path / "empty.mp4")
    r = cli("run", manifest(tmp_path, media, [row(media), bad]), "--executor", "debug")
    assert r.code == 1
    assert (f"{tmp_path / 'train.jsonl'}:2: messages[1].content[2].video: {tmp_path / 'empty.mp4'} is empty "
            "(0 bytes)") in r.err
    assert not (tmp_path / "runs").exists()


def test_images_videos_and_text_rows_train_into_a_language_model_adapter(cli, media, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText

    text_only = {"messages": [{"role": "user", "content": "A text-only question."},
                              {"role": "assistant", "content": "A text answer."}]}
    Image.open(media["image"]).save(tmp_path / "beside.png")
    relative = row(media)  # a path relative to the data file's folder, as validate reads it
    relative["messages"][1]["content"][1]["image"] = "beside.png"
    rows = [row(media, f'{{"score": {i}}}') for i in range(4)] + [relative, text_only]
    evals = [question(media, "image", "red"), question(media, "video", "a talk")]
    r = cli("run", manifest(tmp_path, media, rows, evals), "--executor", "debug")
    assert r.code == 0, r.err
    run = next((tmp_path / "runs").iterdir())
    predictions = read_jsonl(run / "predictions.jsonl")
    assert [p["expected"] for p in predictions] == ["red", "a talk"] and all("actual" in p for p in predictions)
    assert (run / "report.html").is_file()
    final = run / "final"
    with safe_open(str(final / "adapter_model.safetensors"), "pt") as f:
        keys = sorted(f.keys())
    assert len(keys) == 12 and all(".language_model.layers." in k for k in keys)  # the tower stays frozen
    assert {"preprocessor_config.json", "chat_template.json"} <= {p.name for p in final.iterdir()}
    assert len(list((run / "frames").glob("*.npy"))) == 1  # one video, decoded once over 3 steps
    lineage = json.loads((final / "lineage.json").read_text())
    assert lineage["data_files"][0]["rows"] == 6
    assert [m["path"] for m in lineage["media_files"]] == sorted([str(media["image"]), str(media["video"]),
                                                                  str(tmp_path / "beside.png")])
    assert all(len(m["sha256"]) == 64 for m in lineage["media_files"])
    merged = tmp_path / "merged"
    assert cli("merge", final, "--out", merged).code == 0
    model = AutoModelForImageTextToText.from_pretrained(merged)  # no peft
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert (merged / "preprocessor_config.json").is_file()


def test_the_document_manifest_runs_end_to_end_on_a_tiny_model(cli, media, tmp_path):
    """manifests/docvqa-qwen-vl.yaml as shipped (convert the page questions, validate their images,
    train, answer the eval pages, report), on the tiny model and the CPU."""
    r = cli("run", REPO / "manifests" / "docvqa-qwen-vl.yaml", f"model.path={media['model']}",
            f"output_dir={tmp_path / 'runs'}", "train.method=lora", "train.max_steps=2", "train.grad_accum=1",
            "slurm.gpus=0", "slurm.cluster=", "eval.max_new_tokens=4", "--executor", "debug")
    assert r.code == 0, r.err
    run = next((tmp_path / "runs").iterdir())
    assert [p["expected"] for p in read_jsonl(run / "predictions.jsonl")] == \
        [row["expected"] for row in read_jsonl(REPO / "examples" / "docvqa" / "test.jsonl")]
    lineage = json.loads((run / "final" / "lineage.json").read_text())
    assert sorted(Path(m["path"]).name for m in lineage["media_files"]) == ["document1.png", "document2.png"]


def test_the_estimate_counts_a_vision_run_from_its_converted_rows(cli):
    """The real Qwen2.5-VL-7B config (no weights): its rows converted in memory, their images counted,
    then the GPU memory of QLoRA on its language model; nothing written."""
    r = cli("estimate", REPO / "manifests" / "docvqa-qwen-vl.yaml", f"model.path={QWEN_VL}")
    assert r.code == 0, r.err
    lines = r.err.splitlines()
    assert any(x.startswith("preflight: ") and x.endswith(" in 4 rows of image-messages data converted from "
                                                          "train.jsonl, images and video counted") for x in lines)
    assert any(x.startswith("estimate: train needs ") and "weights 6.4 GiB" in x for x in lines)
    assert r.out == "fits: nothing was submitted\n"


def test_a_stopped_vision_run_resumes_to_the_same_adapter_bytes(media, tmp_path):
    """SIGUSR2 during step 2 of 4 (mixed image, video and text rows): the run saves, and run
    again it ends with exactly the adapter of a run never stopped."""
    import hashlib
    import shutil
    import sys

    from slurmtune.config import load_manifest
    from slurmtune.train.recipe import StopRequest, install_signal_handlers, run_training
    from train_helpers import SignalOnLine

    text_only = {"messages": [{"role": "user", "content": "A text-only question."},
                              {"role": "assistant", "content": "A text answer."}]}
    rows = [row(media, f'{{"score": {i}}}') for i in range(3)] + [text_only]
    cfg = load_manifest(manifest(tmp_path, media, rows, max_steps=4, save_steps=2))
    train = [str(tmp_path / "train.jsonl")]
    whole = run_training(cfg, tmp_path / "whole", train, None)
    stop = StopRequest()
    restore = install_signal_handlers(stop)
    stdout, sys.stdout = sys.stdout, SignalOnLine(sys.stdout, " step 1/4  loss")
    try:
        first = run_training(cfg, tmp_path / "stopped", train, None, stop)
    finally:
        sys.stdout, _ = stdout, restore()
    assert (first.status, first.step) == ("stopped", 2)
    resumed = run_training(cfg, shutil.copytree(tmp_path / "stopped", tmp_path / "resumed"), train, None)
    assert (resumed.status, resumed.step) == ("completed", 4)

    def digest(outcome) -> str:
        return hashlib.sha256((outcome.final_dir / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert digest(resumed) == digest(whole)


def test_a_vision_adapter_names_the_language_model_s_own_modules(media, tmp_path):
    """What training checks after saving (it refuses to finish otherwise): every adapted module
    is one of the base's; a renamed adapter is caught, naming the base's module."""
    from safetensors.torch import load_file, save_file

    from slurmtune.data.adapter_keys import adapter_names_problem
    from slurmtune.train.recipe import run_training

    from slurmtune.config import load_manifest
    cfg = load_manifest(manifest(tmp_path, media, [row(media)] * 2, max_steps=1))
    final = run_training(cfg, tmp_path / "run", [str(tmp_path / "train.jsonl")], None).final_dir
    assert adapter_names_problem(final, media["model"]) is None
    weights = load_file(str(final / "adapter_model.safetensors"))
    save_file({k.replace("language_model.", ""): v for k, v in weights.items()}, str(final / "adapter_model.safetensors"))
    problem = adapter_names_problem(final, media["model"])
    assert "e.g. model.layers.0.mlp.gate_proj (the base has model.language_model.layers.0.mlp.gate_proj)" in problem


@pytest.mark.parametrize("adapted, expected", [(["tower"], "visual.blocks."), (["projector"], "visual.merger.")])
def test_lora_vision_adapts_the_tower_or_the_projector_too(media, tmp_path, adapted, expected):
    from safetensors import safe_open

    from slurmtune.config import load_manifest
    from slurmtune.train.recipe import run_training

    cfg = load_manifest(manifest(tmp_path, media, [row(media)] * 2, max_steps=1))
    cfg.lora.vision = adapted
    final = run_training(cfg, tmp_path / "run", [str(tmp_path / "train.jsonl")], None).final_dir
    with safe_open(str(final / "adapter_model.safetensors"), "pt") as f:
        keys = sorted(f.keys())
    vision_keys = [k for k in keys if ".visual." in k]
    assert vision_keys and all(expected in k for k in vision_keys)
    assert len(keys) - len(vision_keys) == 12  # the language model's, as without lora.vision
    count = {"tower": 2 * 5 * 2, "projector": 2 * 2}[adapted[0]]  # blocks x linears x (A, B)
    assert len(vision_keys) == count


def test_lora_vision_on_a_text_model_is_refused(cli, tmp_path):
    from slurmtune.train.tiny_model import make_tiny_model

    model = make_tiny_model(tmp_path / "tiny")
    data = write_jsonl(tmp_path / "t.jsonl", [{"messages": [{"role": "user", "content": "q"},
                                                            {"role": "assistant", "content": "a"}]}])
    r = cli("run", REPO / "manifests" / "quickstart.yaml", f"model.path={model}", "model.tiny_arch=",
            f"data.train_files=[{data}]", "data.inputs=[]", "lora.vision=[tower]", "--executor", "debug", "--dry-run")
    assert r.code == 1
    assert f"lora.vision=['tower']: {model} has no vision tower; fix: lora.vision=[]" in r.err


# --- the SpeechGradebook video manifests ---------------------------------------------------

SGB_MANIFESTS = {"speechgradebook-qwen-vl": 16, "speechgradebook-qwen-vl-corrections": 7,
                 "speechgradebook-qwen-vl-pairs": 16}  # training rows the preflight converts


@pytest.fixture(scope="module")
def speech_videos(tmp_path_factory) -> Path:
    """A media root with a 2-second video for every evaluation of the bundled export."""
    root = tmp_path_factory.mktemp("speech-media")
    export = json.loads((REPO / "examples" / "speechgradebook" / "exported.json").read_text())
    (root / "videos").mkdir()
    for ev in export["evaluations"]:
        write_video(root / ev["video_path"], seconds=2, fps=4)
    return root


@pytest.mark.parametrize("name", SGB_MANIFESTS)
def test_the_speech_video_manifests_are_counted_before_queueing(cli, speech_videos, name):
    """Each video manifest as shipped, against the real Qwen2.5-VL-7B config: its rows converted in
    memory (relative video paths under data.options.media_root), every video opened and counted."""
    r = cli("estimate", REPO / "manifests" / f"{name}.yaml", f"model.path={QWEN_VL}",
            f"data.options.media_root={speech_videos}")
    assert r.code == 0, r.err
    fmt = name.replace("speechgradebook-qwen-vl", "qwen-single").replace("qwen-single-", "qwen-")
    assert f" in {SGB_MANIFESTS[name]} rows of {fmt} data converted from exported.json" in r.err
    missing = cli("estimate", REPO / "manifests" / f"{name}.yaml", f"model.path={QWEN_VL}",
                  f"data.options.media_root={speech_videos / 'elsewhere'}")
    assert missing.code == 1 and "is not a readable video" not in missing.err
    assert f"{speech_videos / 'elsewhere' / 'videos'}/" in missing.err and "file not found" in missing.err


def test_the_comparison_pairs_manifest_runs_end_to_end_on_a_tiny_model(cli, media, speech_videos, tmp_path):
    """Two videos of one student in each prompt: converted, trained, answered and scored per speech."""
    r = cli("run", REPO / "manifests" / "speechgradebook-qwen-vl-pairs.yaml", f"model.path={media['model']}",
            f"data.options.media_root={speech_videos}", f"output_dir={tmp_path / 'runs'}", "train.method=lora",
            "train.max_steps=2", "train.grad_accum=1", "vision.max_pixels=3136", "slurm.gpus=0", "slurm.cluster=",
            "eval.max_new_tokens=4", "--executor", "debug")
    assert r.code == 0, r.err
    run = next((tmp_path / "runs").iterdir())
    predictions = read_jsonl(run / "predictions.jsonl")
    videos = [[p["video"] for p in row["messages"][0]["content"] if p["type"] == "video"] for row in predictions]
    assert videos and all(len(v) == 2 and all(x.startswith(f"{speech_videos}/videos/") for x in v) for v in videos)
    report = json.loads((run / "eval_report.json").read_text())
    assert report["metrics"]["rubric_agreement"]["n"] == len(predictions)
    assert (run / "report.html").read_text().count('data-kind="video"') == 2 * len(predictions)
    trained = {p["video"] for row in read_jsonl(run / "data" / "train_qwen_pairs.jsonl")
               for p in row["messages"][0]["content"] if p["type"] == "video"}
    lineage = json.loads((run / "final" / "lineage.json").read_text())
    assert sorted(m["path"] for m in lineage["media_files"]) == sorted(trained)


# --- Mistral3 (Mistral-Small-3.1-shaped: a Pixtral tower, images only) --------------------

MISTRAL = REPO.parent / "shared" / "models" / "mistral-7b-instruct-v0.3"


@pytest.fixture(scope="module")
def mistral3(media, tmp_path_factory) -> dict:
    from slurmtune.train.tiny_model import make_tiny_mistral3

    root = tmp_path_factory.mktemp("mistral3")
    Image.new("RGB", (200, 60), (10, 10, 200)).save(root / "wide.png")
    return {**media, "model": make_tiny_mistral3(root / "tiny-m3", MISTRAL), "wide": root / "wide.png"}


@pytest.fixture
def m3_encoder(mistral3, tmp_path):
    return load_encoder(mistral3["model"], VisionSettings(max_pixels=56 * 112), tmp_path / "frames")


def test_mistral3_rows_expand_each_image_by_rows_and_train_only_the_answers(m3_encoder, mistral3):
    record = {"messages": [
        {"role": "system", "content": "Read documents."},
        {"role": "user", "content": [{"type": "text", "text": "Title?"}, {"type": "image", "image": str(mistral3["image"])}]},
        {"role": "assistant", "content": "Red page"},
        {"role": "user", "content": "And its colour?"},
        {"role": "assistant", "content": "Red"}]}
    encoded = m3_encoder.encode(record)
    tok, ids, labels = m3_encoder.tokenizer, encoded["input_ids"], encoded["labels"]
    tokens = tok.convert_ids_to_tokens(ids)
    # 100x60 within 56x112 pixels: 112x56 is 2 rows of 4 merged 28-pixel patches.
    grid = ["[IMG]"] * 4 + ["[IMG_BREAK]"] + ["[IMG]"] * 4 + ["[IMG_END]"]
    start = tokens.index("[IMG]")
    assert tokens[:2] == ["<s>", "[SYSTEM_PROMPT]"] and tokens[start:start + 10] == grid
    assert tokens[start + 10] == "[/INST]" and encoded["media"][0]["grid"] == (2, 4)
    trained = [tokens[i] for i, label in enumerate(labels) if label != -100]
    assert tok.convert_tokens_to_string(trained) == "Red page</s>Red</s>"
    assert [labels[i] for i, label in enumerate(labels) if label != -100] == [ids[i] for i, label in enumerate(labels)
                                                                               if label != -100]
    assert m3_encoder.count(record) == (len(ids), 10, len(trained))


def test_mistral3_batches_pad_images_and_answer_as_one_at_a_time(m3_encoder, mistral3):
    from transformers import AutoModelForImageTextToText

    from slurmtune.evaluate.generate import predict_vision

    model = AutoModelForImageTextToText.from_pretrained(mistral3["model"]).eval()
    records = [question(mistral3, "image", "a"), question({"wide": mistral3["wide"]}, "wide", "b"),
               {"messages": [{"role": "user", "content": "A text-only question, longer than the others are."}]}]
    records[1]["messages"][0]["content"][1] = {"type": "image", "image": str(mistral3["wide"])}
    batch = m3_encoder.collate([m3_encoder.prompt(r["messages"]) for r in records[:2]], left=True)
    assert tuple(batch["pixel_values"].shape) == (2, 3, 56, 140)  # padded to the tallest and the widest
    assert batch["image_sizes"].tolist() == [[56, 112], [28, 140]]
    alone = [predict_vision(model, m3_encoder, [r], 1, 6)[0] for r in records]
    assert predict_vision(model, m3_encoder, records, 3, 6) == alone
    assert len(set(alone)) == 3 and all(alone)


def test_a_video_for_mistral3_is_refused_on_the_login_node(cli, mistral3, tmp_path):
    rows = [{"messages": [{"role": "user", "content": [{"type": "text", "text": "Score the talk."},
                                                       {"type": "video", "video": str(mistral3["video"])}]},
                          {"role": "assistant", "content": "4"}]}]
    r = cli("run", manifest(tmp_path, mistral3, rows), "--executor", "debug")
    assert r.code == 1
    assert f"{tmp_path / 'train.jsonl'}:1: video parts: Pixtral models take images only" in r.err
    assert not (tmp_path / "runs").exists()


def test_the_mistral_document_manifest_runs_end_to_end_on_a_tiny_model(cli, mistral3, tmp_path):
    """manifests/docvqa-mistral-small.yaml as shipped, on a tiny Mistral3: trained on the language
    model only, its tower and projector too with lora.vision, answered, reported, merged."""
    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText

    r = cli("run", REPO / "manifests" / "docvqa-mistral-small.yaml", f"model.path={mistral3['model']}",
            f"output_dir={tmp_path / 'runs'}", "train.method=lora", "train.max_steps=2", "train.grad_accum=1",
            "lora.vision=[tower, projector]", "slurm.gpus=0", "slurm.cluster=", "eval.max_new_tokens=4",
            "--executor", "debug")
    assert r.code == 0, r.err
    run = next((tmp_path / "runs").iterdir())
    assert [p["expected"] for p in read_jsonl(run / "predictions.jsonl")] == \
        [row["expected"] for row in read_jsonl(REPO / "examples" / "docvqa" / "test.jsonl")]
    with safe_open(str(run / "final" / "adapter_model.safetensors"), "pt") as f:
        keys = sorted(f.keys())
    parts = {re.search(r"^base_model\.model\.model\.(\w+)\.", k).group(1) for k in keys}
    assert parts == {"language_model", "vision_tower", "multi_modal_projector"}
    assert sum(".language_model.layers." in k for k in keys) == 2 * 7 * 2  # layers x projections x (A, B)
    assert sum(".vision_tower.transformer.layers." in k for k in keys) == 2 * 7 * 2
    assert sum(".multi_modal_projector." in k for k in keys) == 3 * 2  # linear_1, linear_2, merging_layer
    final = {p.name for p in (run / "final").iterdir()}
    assert {"preprocessor_config.json", "processor_config.json", "chat_template.json"} <= final
    assert cli("merge", run / "final", "--out", tmp_path / "merged").code == 0
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged")  # no peft
    assert type(merged).__name__ == "Mistral3ForConditionalGeneration"


@pytest.mark.parametrize("family", ["qwen", "mistral3"])
def test_a_phantom_row_makes_a_text_batch_run_the_tower_and_changes_no_loss(family, media, mistral3, tmp_path):
    """What ZeRO-3 runs need (tests/test_deepspeed.py runs them): each batch holds every media kind
    of the run, a phantom row standing in for those it lacks, trained on nowhere."""
    from transformers import AutoModelForImageTextToText

    model_dir = media["model"] if family == "qwen" else mistral3["model"]
    encoder = load_encoder(model_dir, SETTINGS, tmp_path / "frames")
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    text = encoder.encode({"messages": [{"role": "user", "content": "A text-only question."},
                                        {"role": "assistant", "content": "A text answer."}]})
    kinds = ("image", "video") if family == "qwen" else ("image",)
    plain, padded = encoder.collate([text, text]), encoder.collate([text, text], every_kind=kinds)
    assert "pixel_values" not in plain and len(padded["input_ids"]) == 2 + len(kinds)
    assert (padded["labels"][2:] == -100).all()
    grids = {"qwen": ("image_grid_thw", "video_grid_thw"), "mistral3": ("image_sizes",)}[family]
    assert all(len(padded[g]) == 1 for g in grids)  # one phantom of each kind
    seen = []
    hook = (model.model.visual if family == "qwen" else model.model.vision_tower).register_forward_hook(
        lambda *args: seen.append(1))
    with torch.no_grad():
        assert model(**padded).loss.item() == model(**plain).loss.item()
    hook.remove()
    assert len(seen) == len(kinds)  # the tower ran once per kind; without the phantoms, never


def test_a_vision_run_too_big_for_its_gpu_is_refused_with_the_pixels_that_fit(cli, tmp_path):
    """The estimate takes the longest row as counted (2,500 image tokens of a 1400x1400 page), not
    max_length, and says which vision knob brings it under the partition's GPU memory."""
    Image.new("RGB", (1400, 1400), (250, 250, 250)).save(tmp_path / "page.png")
    data = write_jsonl(tmp_path / "pages.jsonl", [{"messages": [
        {"role": "user", "content": [{"type": "text", "text": "Read it."}, {"type": "image", "image": "page.png"}]},
        {"role": "assistant", "content": "A page."}]}] * 2)
    m = tmp_path / "pages.yaml"
    m.write_text(json.dumps({"name": "pages", "output_dir": str(tmp_path / "runs"), "model": {"path": str(QWEN_VL)},
                             "data": {"train_files": [str(data)]}, "vision": {"max_pixels": 3211264},
                             "train": {"method": "qlora", "batch_size": 8, "max_length": 8192},
                             "slurm": {"gpus": 1, "time_min": 60}}))
    profile = tmp_path / "gpu16.yaml"
    profile.write_text((REPO / "slurm" / "local-test.yaml").read_text() + "\ngpu_mem_gb: 16\n")
    r = cli("estimate", m, "--cluster", profile)
    assert r.code == 1
    problem = next(line for line in r.err.splitlines() if "more than the" in line)
    assert "train: estimated 16.1 GiB" in problem and "vision.max_pixels=1605632: 14.3 GiB" in problem
    assert "vision.max_pixels=802816: 10.5 GiB" in problem  # recounted from the page's size, not halved
    fits = cli("estimate", m, "vision.max_pixels=1605632", "--cluster", profile)
    assert fits.code == 0, fits.err
    assert "estimate: train needs 14.3 GiB" in fits.err  # what the fix said
    assert "tokens trained (0%) in 2 rows" in fits.err and not (tmp_path / "runs").exists()
