"""Peak memory while loading a Hugging Face model directory: lmforge against transformers.

    python benchmarks/load_memory.py [--preset gpu-125m] [--dtypes float32 bfloat16]

Writes a random-weight Llama of the preset's shape as a HF directory (once per stored
dtype), then loads it in a fresh process for each loader and reports the growth of
the process's peak resident memory over its size after imports, divided by the size
of the loaded fp32 weights. Both loaders end with fp32 weights on the CPU.

Each load runs in its own process so that one loader's pages never count for the other,
after loading a tiny model of the same family, so that the code both loaders run
(torch's and safetensors' libraries, paged in on first use) is not counted as weights.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

CHILD = r"""
import json, resource, sys, time
import torch
loader, warm_up, path = sys.argv[1], sys.argv[2], sys.argv[3]
if loader == "transformers":
    import transformers
else:
    from lmforge.checkpoint import load_model
def peak():  # VmHWM: this process image's high-water mark (ru_maxrss would carry the parent's over exec)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
def current():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()
def load(folder):
    if loader == "transformers":
        return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return load_model(folder)
small = load(warm_up)  # pages in the code both paths run (torch, safetensors ...): not the weights' cost
del small
base = current()
start = time.perf_counter()
model = load(path)
seconds = time.perf_counter() - start
weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
total = sum(float(p.float().sum()) for p in model.parameters())  # touch every weight
print(json.dumps({"base": base, "peak": peak(), "weights": weights, "seconds": seconds}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpu-125m")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    args = parser.parse_args()

    import torch
    from common import llama_twin, machine

    from lmforge.model import DecoderLM, preset

    print(f"machine: {machine()}")
    torch.manual_seed(0)
    model = DecoderLM(preset(args.preset))
    print(f"model: {args.preset}, {model.num_parameters() / 1e6:.0f}M parameters")
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.dtypes:
            folder, tiny = Path(tmp) / dtype, Path(tmp) / f"tiny-{dtype}"
            llama_twin(model).to(getattr(torch, dtype)).save_pretrained(folder)
            llama_twin(DecoderLM(preset("tiny"))).to(getattr(torch, dtype)).save_pretrained(tiny)
            size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
            print(f"stored as {dtype}: {size / 1e6:.0f} MB of safetensors")
            for loader in ("lmforge", "transformers"):
                out = subprocess.run([sys.executable, "-c", CHILD, loader, str(tiny), str(folder)], check=True,
                                     capture_output=True, text=True).stdout
                r = json.loads(out.strip().splitlines()[-1])
                growth = r["peak"] - r["base"]
                print(f"  {loader:>12}: peak growth {growth / 1e6:6.0f} MB = {growth / r['weights']:.2f}x "
                      f"the {r['weights'] / 1e6:.0f} MB of fp32 weights; {r['seconds']:.1f} s", flush=True)


if __name__ == "__main__":
    main()
