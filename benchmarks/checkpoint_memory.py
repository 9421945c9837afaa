"""Peak memory of loading a big checkpoint: ``load_model`` against a plain ``torch.load``.

    .venv/bin/python benchmarks/checkpoint_memory.py [--latent-dim 512] [--keep DIR]

Writes (in a temporary directory, or ``--keep DIR``) a checkpoint in the v2 teacher's published
layout with seeded random weights at a scaled-down architecture (``--latent-dim 512``: 2 layers,
feed-forward 4·D, about 1.3 GB; the published teacher is 8.26 GB), then measures each way of
loading it in a fresh Python process, as the peak resident set size (``ru_maxrss``) of that process:

- ``import only``: Python, torch and tessera imported, nothing loaded (what every line includes);
- ``torch.load``: the plain read of the file without memory mapping, one copy of the weights in
  memory: the floor for any loader that holds the weights in RAM;
- ``load_model``: tessera's loader (memory-mapped file, model built on the meta device taking the
  tensors over), then one forward pass on one pixel, which reads every weight;
- ``copying loader``: what ``load_model`` did before: ``torch.load`` without mapping, a model built
  with its own weights, ``load_state_dict`` copying into them (two copies), then the same forward.

Ratios are peak RSS over the file size, and peak RSS above ``import only`` over the file size
(the weights' share: 1.0 is one copy of them). The memory-mapped pages are the file's page cache: they
count in RSS while mapped, but are shared and can be dropped and re-read under memory pressure.
This process imports neither torch nor the weights and writes the checkpoint in a child too:
Linux carries a parent's resident size into a child's ``ru_maxrss`` across fork and exec.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

MODES = ("import only", "torch.load", "load_model", "copying loader")


def write_checkpoint(path: str, latent_dim: int) -> None:
    """Seeded random weights of a scaled teacher in the published ``encoder_state_dict`` + ``arch`` layout."""
    import torch

    from tessera.models import get_family

    family = get_family("v2-teacher")
    arch = {**family.default_arch(), "latent_dim": latent_dim, "num_layers": 2, "dim_feedforward": 16 * latent_dim}
    with torch.device("meta"):
        shapes = {key: value.shape for key, value in family.build(**arch).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    state = {key: torch.empty(shape).normal_(std=0.02, generator=generator) for key, shape in shapes.items()}
    torch.save(family.checkpoint_payload(state, arch), path)
    print(json.dumps(arch))


def one_pixel_forward(model) -> None:
    """A forward pass on one pixel of 8 + 8 steps: every weight is read once."""
    import torch

    with torch.inference_mode():
        s2 = torch.cat([torch.zeros(1, 8, 10), torch.arange(1, 9.0).view(1, 8, 1)], -1)
        s1 = torch.cat([torch.zeros(1, 8, 2), torch.arange(1, 9.0).view(1, 8, 1)], -1)
        model(s2, s1)


def measure(mode: str, path: str) -> None:
    """Run in a fresh process: load ``path`` the way ``mode`` says and print the peak RSS in bytes."""
    import torch

    from tessera.models import get_family, load_model
    from tessera.models.checkpoint import normalise_state_dict

    if mode == "torch.load":
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    elif mode == "load_model":
        one_pixel_forward(load_model(path))
    elif mode == "copying loader":
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        family = get_family("v2-teacher")
        model = family.build(**{**family.default_arch(), **family.arch_from_checkpoint(checkpoint)}).eval()
        model.load_state_dict(normalise_state_dict(family.state_dict_from_checkpoint(checkpoint)), strict=True)
        one_pixel_forward(model)
    print(json.dumps({"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))  # KiB on Linux


def in_child(*args: str) -> dict:
    """The JSON that this script prints last when run with ``args`` in a fresh process."""
    result = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent-dim", type=int, default=512, help="scales the teacher (published: 1024)")
    parser.add_argument("--keep", type=Path, help="write the checkpoint in this directory and keep it")
    parser.add_argument("--measure", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    parser.add_argument("--write", metavar="PATH", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(*args.measure)
        return
    if args.write:
        write_checkpoint(args.write, args.latent_dim)
        return
    with tempfile.TemporaryDirectory() as scratch:
        directory = args.keep or Path(scratch)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "teacher-scaled.pt"
        arch = in_child("--write", str(path), "--latent-dim", str(args.latent_dim))
        size = os.path.getsize(path)
        print(f"checkpoint: v2-teacher layout, {arch}, {size / 1e9:.2f} GB")
        print(f"{'loader':<16} {'peak RSS (GB)':>14} {'/ file size':>12} {'above import / file size':>25}")
        baseline = in_child("--measure", "import only", str(path))["peak_rss"]
        for mode in MODES:
            rss = baseline if mode == "import only" else in_child("--measure", mode, str(path))["peak_rss"]
            print(f"{mode:<16} {rss / 1e9:>14.2f} {rss / size:>12.2f} {(rss - baseline) / size:>25.2f}")


if __name__ == "__main__":
    main()
