"""Peak memory of loading pretrained weights: `load_pretrained` against the naive way.

Writes a randomly initialised model (default gpt2-355m: 1.4 GB in fp32) in the Hugging Face
layout (model.safetensors), as the reference book's .pth and, when TensorFlow is installed
(the tf extra), as OpenAI's TensorFlow checkpoint; then loads each in a fresh subprocess and
reports the process's peak resident set (VmHWM, which is what ru_maxrss reports) above its
resident set just before loading (TensorFlow imported already), as a multiple of the
checkpoint's size.

The naive load reads the whole checkpoint (`safetensors.torch.load_file` / `torch.load` /
every variable of the TF checkpoint, as the book's gpt_download.py does), builds the model
normally (randomly initialised), converts the names and layouts in memory and calls
`load_state_dict`.

    .venv/bin/python benchmarks/bench_load_memory.py [--model gpt2-355m] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from gptrain.models import Transformer, get_model_config
from gptrain.models.layouts import book_layout, hf_gpt2_layout, hf_llama_layout, openai_gpt2_layout
from gptrain.models.weights import layout_state_dict, load_pretrained, save_hf_pretrained


def resident_mb() -> tuple[float, float]:
    """(current, peak) resident set of this process in MB."""
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024


def naive_load(model_name: str, file: str) -> Transformer:
    config = get_model_config(model_name)
    if file.endswith(".pth"):
        tensors, layout = torch.load(file, map_location="cpu", weights_only=True), book_layout(config)
    elif os.path.isdir(file):  # OpenAI's TF checkpoint; conv1d weights are (1, in, out)
        import tensorflow as tf

        reader = tf.train.load_checkpoint(os.path.join(file, "model.ckpt"))
        arrays = {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}
        tensors = {name: torch.from_numpy(a[0] if a.ndim == 3 else a) for name, a in arrays.items()}
        layout = openai_gpt2_layout(config)
    else:
        from safetensors.torch import load_file

        tensors = load_file(file)
        layout = hf_gpt2_layout(config) if config.family == "gpt2" else hf_llama_layout(config)
    model = Transformer(config)
    state = model.state_dict()
    for dest, parts in layout.plan.items():
        fused = torch.cat([tensors[p.name].t() if p.transposed else tensors[p.name] for p in parts])
        state[dest] = torch.cat([fused, fused.new_zeros(state[dest].shape[0] - len(fused), *fused.shape[1:])])
    model.load_state_dict(state)
    return model


def measure(case: str, path: str, model_name: str) -> None:
    """Runs in the fresh subprocess: load once, print the numbers as JSON."""
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "hparams.json")):
        import tensorflow  # noqa: F401 (its own memory is not the loader's)
    before, _ = resident_mb()
    start = time.perf_counter()
    model = load_pretrained(path) if case == "load_pretrained" else naive_load(model_name, path)
    seconds = time.perf_counter() - start
    _, peak = resident_mb()
    assert model.tok_emb.weight.shape[0] == model.config.padded_vocab_size
    print(json.dumps({"before_mb": before, "peak_mb": peak, "seconds": seconds}))


def write_openai_checkpoint(model: Transformer, folder: str) -> None:
    """hparams.json and model.ckpt.* as OpenAI's release (a TF1 Saver checkpoint)."""
    import tensorflow as tf

    config = model.config
    os.makedirs(folder)
    hparams = {"n_vocab": config.vocab_size, "n_ctx": config.context_length, "n_embd": config.d_model,
               "n_head": config.n_heads, "n_layer": config.n_layers}
    with open(os.path.join(folder, "hparams.json"), "w") as f:
        json.dump(hparams, f)
    tensors = layout_state_dict(model, openai_gpt2_layout(config))
    with tf.Graph().as_default():
        variables = [tf.compat.v1.Variable(t.numpy()[None] if name.endswith("/w") else t.numpy(), name=name)
                     for name, t in tensors.items()]
        saver = tf.compat.v1.train.Saver(variables, save_relative_paths=True)
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            saver.save(session, os.path.join(folder, "model.ckpt"), write_meta_graph=False)


def write_checkpoints(model_name: str, workdir: str) -> list[str]:
    """The checkpoint files (the TF one: its folder, when TensorFlow is installed)."""
    hf_dir, pth = os.path.join(workdir, "hf"), os.path.join(workdir, f"{model_name}.pth")
    openai_dir = os.path.join(workdir, "openai")
    with_tf = importlib.util.find_spec("tensorflow") is not None
    config = get_model_config(model_name)
    model = Transformer(config)
    if not os.path.exists(hf_dir):
        save_hf_pretrained(model, hf_dir)
    if not os.path.exists(pth):
        torch.save(layout_state_dict(model, book_layout(config)), pth)
    if with_tf and not os.path.exists(openai_dir):
        write_openai_checkpoint(model, openai_dir)
    return [os.path.join(hf_dir, "model.safetensors"), pth] + [openai_dir] * with_tf


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2-355m", help="a gpt2 preset (the .pth layout is GPT-2 only)")
    parser.add_argument("--workdir", default=None, help="where to keep the checkpoints (default: a temporary folder)")
    parser.add_argument("--measure", nargs=2, metavar=("CASE", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(*args.measure, model_name=args.model)
        return 0

    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        workdir = args.workdir or tmp
        os.makedirs(workdir, exist_ok=True)
        files = write_checkpoints(args.model, workdir)
        print(f"{'checkpoint':<20} {'loader':<16} {'size MB':>8} {'RSS before':>11} {'peak RSS':>9} "
              f"{'increase/size':>14} {'seconds':>8}")
        for file in files:
            data = os.path.join(file, "model.ckpt.data-00000-of-00001") if os.path.isdir(file) else file
            size = os.path.getsize(data) / 2**20
            for case in ("load_pretrained", "naive"):
                target = os.path.dirname(file) if case == "load_pretrained" and file.endswith(".safetensors") else file
                out = subprocess.run(
                    [sys.executable, __file__, "--model", args.model, "--measure", case, target],
                    check=True, capture_output=True, text=True,
                ).stdout
                r = json.loads(out.strip().splitlines()[-1])
                print(f"{os.path.basename(file):<20} {case:<16} {size:>8.0f} {r['before_mb']:>11.0f} "
                      f"{r['peak_mb']:>9.0f} {(r['peak_mb'] - r['before_mb']) / size:>14.2f} {r['seconds']:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
