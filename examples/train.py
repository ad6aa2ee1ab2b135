"""Train a tiny YOCO or Block Transformer on Shakespeare with the stock `transformers.Trainer` (offline, CPU-friendly).

    python examples/train.py                                   # YOCO (gated retention), Hamlet, ~200 steps
    python examples/train.py --model block --plays all         # Block Transformer on all 38 plays
    python examples/train.py --self-decoder sliding_window --hidden-size 256 --num-layers 8 --max-steps 2000
    torchrun --nproc_per_node 2 examples/train.py --max-steps 20       # DDP (gloo on CPU), same script

All flags: `python examples/train.py --help` (the same as `hf-yoco train`).
"""

import sys

from hf_yoco.training import main

if __name__ == "__main__":
    sys.exit(main())
